"""Regenerate the generated parts of README.md: the config reference (from the field docs in
moetune.config.schema) and the table of supported model families (from the family specs).

    python scripts/update_config_reference.py
"""

from pathlib import Path

from moetune.config.reference import replace_reference
from moetune.models.families._readme import replace_family_table

README = Path(__file__).resolve().parent.parent / "README.md"

if __name__ == "__main__":
    README.write_text(replace_family_table(replace_reference(README.read_text())))
    print(f"updated {README}")
