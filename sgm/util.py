"""Small helpers shared by the sgm modules; config instantiation is the project's one implementation."""
import torch

from ldm.util import default, get_obj_from_str, instantiate_from_config  # noqa: F401 (re-exported)


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append trailing singleton dimensions so that `x` has `target_dims` dimensions."""
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"Input has {x.ndim} dims but target_dims is {target_dims}, which is fewer.")
    return x[(...,) + (None,) * dims_to_append]
