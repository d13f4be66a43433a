"""Regenerate the config reference in README.md from the field docs in moetune.config.schema.

    python scripts/update_config_reference.py
"""

from pathlib import Path

from moetune.config.reference import replace_reference

README = Path(__file__).resolve().parent.parent / "README.md"

if __name__ == "__main__":
    README.write_text(replace_reference(README.read_text()))
    print(f"updated {README}")
