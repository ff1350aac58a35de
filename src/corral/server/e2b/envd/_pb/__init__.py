"""Generated protobuf messages of envd's services (scripts/gen-envd-proto; do not edit)."""
