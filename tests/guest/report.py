"""Reading the inside run's junit XML (xunit1: each testcase names its file) into one verdict per file."""

from __future__ import annotations

import xml.etree.ElementTree as ET  # the file is written by our own pytest run inside the guest
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FileResult:
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # "name: message\ndetails"
    skipped: list[str] = field(default_factory=list)  # "name: reason"


@dataclass
class GuestReport:
    files: dict[str, FileResult]
    required: bool  # the guest tier is required: a file whose tests all skipped fails

    @classmethod
    def load(cls, junit: Path, *, required: bool) -> GuestReport:
        files: dict[str, FileResult] = {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            path = case.get("file") or _file_from_classname(case.get("classname", ""), case.get("name", ""))
            result = files.setdefault(path, FileResult())
            name = case.get("name", "?")
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            skip = case.find("skipped")
            if problem is not None:
                text = (problem.text or "").strip()
                result.failed.append(f"{name}: {problem.get('message', '')}\n{text[-3000:]}")
            elif skip is not None:
                result.skipped.append(f"{name}: {skip.get('message', '')}")
            else:
                result.passed.append(name)
        return cls(files=files, required=required)

    def verdict(self, path: str) -> tuple[str, str]:
        """("pass" | "fail" | "skip", message) for one inside file, by its path relative to the repo."""
        result = self.files.get(path)
        if result is None:
            return "fail", f"{path}: no results from the guest (not collected? see the inside pytest log)"
        if result.failed:
            return "fail", f"{path}: {len(result.failed)} failed inside the guest:\n\n" + "\n\n".join(
                result.failed
            )
        if not result.passed:
            reasons = "\n".join(result.skipped) or "(no tests)"
            if self.required:
                return (
                    "fail",
                    f"{path}: every test skipped inside the guest (guest tier required):\n{reasons}",
                )
            return "skip", f"{path}: every test skipped inside the guest:\n{reasons}"
        note = f" ({len(result.skipped)} skipped: {'; '.join(result.skipped)})" if result.skipped else ""
        return "pass", f"{path}: {len(result.passed)} passed{note}"


def _file_from_classname(classname: str, name: str) -> str:
    """Collection errors carry no file attribute: 'tests.guest.inside.test_x' -> its path."""
    dotted = next((s for s in (classname, name) if s.startswith("tests.guest.inside.")), "")
    parts = dotted.split(".")
    module = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    return "/".join(parts[: module + 1]) + ".py"
