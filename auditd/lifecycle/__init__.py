"""Moving the record in and out of a store: export files and their import (proofs.md,
"Export files"; docs/design/export.md)."""
