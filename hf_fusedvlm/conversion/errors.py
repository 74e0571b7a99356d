"""The errors the converters raise: each message names the problem and the fix. Torch-free, like `options`, so that
the command's parser loads in a moment."""


class ConversionError(ValueError):
    """A conversion that cannot proceed; the message names the problem and the fix."""


class VerificationError(ConversionError):
    """`--verify` found the converted model computing something else than the source."""


# The dtypes `--dtype` casts to (torch's names).
DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(dtype):
    """`"bfloat16"` -> `torch.bfloat16`; a `torch.dtype` or None is returned as is."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
        import torch

        return getattr(torch, dtype)
    return dtype


def as_torch_dtype(value):
    """A config's `dtype` (a `torch.dtype`, a name such as "bfloat16" or "torch.bfloat16", or None) as a torch dtype
    among `DTYPES`, else None."""
    name = str(value).removeprefix("torch.") if value is not None else None
    return parse_dtype(name) if name in DTYPES else None


def listed(items, limit: int = 12) -> str:
    """`a, b, c, ... and N more`: the sorted items of an error message, the first `limit` of them."""
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
