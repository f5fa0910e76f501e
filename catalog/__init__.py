"""The catalog: the appliance's single source of truth, one SQLite database in WAL mode.

Imports no sibling package. Schema changes only through named migrations (``catalog.db``).
"""

from catalog.db import Catalog, open_catalog

__all__ = ["Catalog", "open_catalog"]
