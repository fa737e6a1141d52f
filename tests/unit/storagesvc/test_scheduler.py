"""The scheduler's filters and weighers (storagesvc.scheduler.rank) on hand-made backend states."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from blockwire.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from storagesvc.scheduler import BackendState, PlacementRequest, compile_specs, rank, spec_matches

GIB = 1 << 30


def state(name: str, **kw: object) -> BackendState:
    base = BackendState(
        node="",
        backend=name,
        total_bytes=100 * GIB,
        free_bytes=100 * GIB,
        provisioned_bytes=0,
        volume_count=0,
        capabilities={"thin_provisioning": "true", "multiattach": "true", "transport": "iscsi"},
        availability_zone="az1",
        up=True,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def names(backends: list[BackendState]) -> list[str]:
    return [b.backend for b in backends]


def req(size: int = GIB, **specs: str) -> PlacementRequest:
    return PlacementRequest(size_bytes=size, extra_specs=specs)


# -- filters


def test_down_backends_take_nothing() -> None:
    ranked = rank([state("a", up=False), state("b")], req())
    assert names(ranked) == ["b"]
    with pytest.raises(FailedPrecondition, match=r"1 down \(a\)"):
        rank([state("a", up=False)], req())


def test_thin_backend_provisions_up_to_total_times_ratio() -> None:
    thin = state(
        "t",
        total_bytes=10 * GIB,
        free_bytes=1 * GIB,
        provisioned_bytes=15 * GIB,
        max_over_subscription_ratio=2.0,
    )
    assert names(rank([thin], req(5 * GIB))) == ["t"]  # 15 + 5 = 20 = 10 * 2
    with pytest.raises(ResourceExhausted, match=r"without room for 6442450944 bytes \(t\)"):
        rank([thin], req(6 * GIB))


def test_thick_backend_needs_free_space_whatever_its_ratio() -> None:
    thick = state(
        "k",
        capabilities={"thin_provisioning": "false"},
        total_bytes=10 * GIB,
        free_bytes=2 * GIB,
        provisioned_bytes=0,
        max_over_subscription_ratio=20.0,
    )
    assert names(rank([thick], req(2 * GIB))) == ["k"]
    with pytest.raises(ResourceExhausted):
        rank([thick], req(2 * GIB + 1))


def test_a_ratio_below_one_counts_as_one() -> None:
    thin = state("t", total_bytes=10 * GIB, max_over_subscription_ratio=0.5)
    assert names(rank([thin], req(10 * GIB))) == ["t"]


def test_availability_zone_from_request_or_extra_spec() -> None:
    a, b = state("a", availability_zone="az1"), state("b", availability_zone="az2")
    assert names(rank([a, b], PlacementRequest(GIB, {}, availability_zone="az2"))) == ["b"]
    assert names(rank([a, b], req(availability_zone="az1"))) == ["a"]
    with pytest.raises(FailedPrecondition, match="not in availability zone 'az3'"):
        rank([a, b], PlacementRequest(GIB, {}, availability_zone="az3"))


def test_explicit_backend_and_volume_backend_name() -> None:
    a, b = state("a"), state("b", free_bytes=200 * GIB, total_bytes=200 * GIB)
    assert names(rank([a, b], PlacementRequest(GIB, {}, backend="a"))) == ["a"]
    assert names(rank([a, b], req(volume_backend_name="a"))) == ["a"]
    with pytest.raises(InvalidArgument, match="unknown backend 'c'"):
        rank([a, b], PlacementRequest(GIB, {}, backend="c"))
    with pytest.raises(InvalidArgument, match="not the backend the volume type names"):
        rank([a, b], PlacementRequest(GIB, {"volume_backend_name": "a"}, backend="b"))


@pytest.mark.parametrize(
    ("spec", "value", "ok"),
    [
        ("<is> True", "true", True),
        ("<is> True", "True", True),
        ("<is> True", "false", False),
        ("<is> False", "false", True),
        ("== 3", "3", True),
        ("== 3", "3.0", True),
        ("== 3", "4", False),
        ("!= 3", "4", True),
        (">= 10", "12", True),
        (">= 10", "9", False),
        (">= 10", "many", False),
        ("<= 10", "10", True),
        ("> 1.5", "2", True),
        ("< 1.5", "2", False),
        ("s== iscsi", "iscsi", True),
        ("s== iscsi", "nvme-tcp", False),
        ("s!= iscsi", "nvme-tcp", True),
        ("<in> ssd", "fast-ssd-pool", True),
        ("<in> ssd", "hdd", False),
        ("<or> iscsi <or> nvme-tcp", "nvme-tcp", True),
        ("<or> iscsi <or> nvme-tcp", "rbd", False),
        ("file", "file", True),
        ("file", "lvm-thin", False),
        ("true", "True", True),
        ("False", "true", False),
    ],
)
def test_operators(spec: str, value: str, ok: bool) -> None:
    assert spec_matches("k", spec)(value) is ok


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("<is> maybe", "<is> takes True or False"),
        (">= lots", "'lots' is not a number"),
        ("== nan", "NaN"),
        ("<in>", "<in> needs a value"),
        ("<xor> a", "unknown operator"),
    ],
)
def test_malformed_specs_name_the_key(spec: str, problem: str) -> None:
    with pytest.raises(InvalidArgument, match=rf"extra_specs\[capabilities:speed\]: .*{problem}"):
        compile_specs({"capabilities:speed": spec})
    with pytest.raises(InvalidArgument, match=r"extra_specs\[capabilities:speed\]"):
        rank([state("a")], req(**{"capabilities:speed": spec}))


def test_capabilities_filter_scoped_and_unscoped_keys_and_missing_capability() -> None:
    a = state("a", capabilities={"thin_provisioning": "true", "multiattach": "true", "transport": "iscsi"})
    b = state(
        "b", capabilities={"thin_provisioning": "true", "multiattach": "false", "transport": "nvme-tcp"}
    )
    assert names(rank([a, b], req(multiattach="<is> True"))) == ["a"]
    assert names(rank([a, b], req(**{"capabilities:transport": "<or> nvme-tcp <or> rbd"}))) == ["b"]
    # other scopes are properties of the volume, not placement rules
    assert names(rank([a, b], req(**{"qos:read_iops_sec": "100"}))) == ["a", "b"]
    with pytest.raises(FailedPrecondition, match=r"2 without disk_type='ssd' \(a, b\)"):
        rank([a, b], req(disk_type="ssd"))


def test_capacity_failure_is_resource_exhausted_even_when_others_lack_specs() -> None:
    a = state("a", capabilities={"thin_provisioning": "true", "encryption": "true"}, total_bytes=GIB)
    b = state("b", capabilities={"thin_provisioning": "true", "encryption": "false"})
    with pytest.raises(ResourceExhausted) as err:
        rank([a, b], req(2 * GIB, encryption="<is> True"))
    assert "1 without encryption='<is> True' (b)" in err.value.message
    assert "1 without room for" in err.value.message


def test_no_candidates() -> None:
    with pytest.raises(FailedPrecondition, match="no backends"):
        rank([], req())


# -- weighers


def test_free_capacity_first_then_volume_count_then_name() -> None:
    a = state("a", provisioned_bytes=10 * GIB, volume_count=1)
    b = state("b", provisioned_bytes=0, volume_count=5)
    c = state("c", provisioned_bytes=10 * GIB, volume_count=0)
    d = state("d", provisioned_bytes=10 * GIB, volume_count=0)
    assert names(rank([a, b, c, d], req())) == ["b", "c", "d", "a"]


def test_thick_room_is_free_space() -> None:
    thick = {"thin_provisioning": "false"}
    a = state("a", capabilities=thick, free_bytes=5 * GIB)
    b = state("b", capabilities=thick, free_bytes=50 * GIB)
    assert names(rank([a, b], req())) == ["b", "a"]


def test_volume_count_weigher() -> None:
    a = state("a", provisioned_bytes=50 * GIB, volume_count=1)
    b = state("b", provisioned_bytes=0, volume_count=5)
    assert names(rank([a, b], req(), weigher="volume_count")) == ["a", "b"]
    with pytest.raises(InvalidArgument, match="weigher"):
        rank([a, b], req(), weigher="random")


def test_rank_is_deterministic_whatever_the_input_order() -> None:
    states = [state(f"b{i:03d}", provisioned_bytes=(i % 7) * GIB, volume_count=i % 3) for i in range(200)]
    first = names(rank(states, req()))
    rng = random.Random(7)
    for _ in range(5):
        shuffled = states[:]
        rng.shuffle(shuffled)
        assert names(rank(shuffled, req())) == first
    # ties on room and count are broken by name, then node
    same = [state("x", node="n2"), state("x", node="n1")]
    assert [b.node for b in rank(same, req())] == ["n1", "n2"]
