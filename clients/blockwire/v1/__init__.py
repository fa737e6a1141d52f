"""Generated code of the blockwire v1 API. Do not edit: run scripts/genproto."""
