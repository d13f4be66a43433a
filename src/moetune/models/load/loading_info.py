"""The one check that a checkpoint filled every weight of the model it declares, shared by the factory,
upcycling and the upcycled architecture's own ``from_pretrained``."""

from __future__ import annotations

from moetune.errors import UserError


def check_loading_info(info: dict, source, *, text_of_multimodal: bool = False) -> None:
    """Raise a UserError when loading left weights missing, unused or of the wrong shape.
    ``text_of_multimodal``: the text model of a multimodal checkpoint was loaded, whose vision tower is unused
    by design (every weight of the text model must still be found)."""
    kinds = ("missing_keys", "mismatched_keys") if text_of_multimodal else ("missing_keys", "unexpected_keys",
                                                                            "mismatched_keys")
    problems = {kind: sorted(info.get(kind) or ()) for kind in kinds}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{kind.replace('_', ' ')}: {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                           for kind, keys in problems.items())
        raise UserError(f"The checkpoint at {source} does not match the model it declares ({listed}). moetune does "
                        "not re-initialise weights silently; re-create the checkpoint with `moetune upcycle`.")
