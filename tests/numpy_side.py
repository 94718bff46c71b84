"""The reference's choice of projection side, transcribed for the tests (independent of fira_jax)."""


def np_side(proj_type: str, m: int, n: int) -> str:
    """ "std": right if m >= n else left; "reverse_std": the opposite; "left"/"right"/"full": fixed."""
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    return proj_type
