import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def whole(parts, batch, field: str = "hidden_states"):
    """The teacher's per-micro-batch parts (TeacherActor.score) put back in the batch's response-token order."""
    parts = list(parts)
    first = getattr(parts[0], field)
    out = torch.full((batch.num_response_tokens, *first.shape[1:]), float("nan"), dtype=first.dtype)
    for part in parts:
        out[part.token_index] = getattr(part, field)
    assert not out.isnan().any(), "the parts do not cover every response token"
    return out
