"""Migration between servers (LXD's protocol, shared/reference/API.md §15): see
docs/design/migration.md for what each module owns."""
