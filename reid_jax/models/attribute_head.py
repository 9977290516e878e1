"""The paper's attribute classifier: ``x = sigmoid(f @ W)`` on the frozen retrieval embedding.

``f`` is the embedding that is ranked and explained (``reid_jax.models.agw.retrieval_embedding``;
``docs/design.md``, "One embedding is ranked, classified and explained"); ``W`` is the
``[N, A]`` kernel (N = 2048, A = 30), *without bias*, used directly by the explanation kernels
(eq. 3.2 weights ``w_na``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from reid_jax.data.attributes import NUM_ATTRIBUTES


class AttributeOutputs(NamedTuple):
    logits: jax.Array  # [B, A] f @ W
    probabilities: jax.Array  # [B, A] sigmoid(f @ W)


class AttributeHead(nnx.Module):
    """One bias-free dense layer ``embedding [B, N] -> AttributeOutputs([B, A], [B, A])``.

    ``kernel`` is an ``nnx.Param`` of shape ``[N, A]`` (the paper's ``W``); initialised
    LeCun-normal.
    """

    def __init__(
        self, embedding_dim: int, num_attributes: int = NUM_ATTRIBUTES, *, rngs: nnx.Rngs
    ):
        if embedding_dim < 1 or num_attributes < 1:
            raise ValueError(
                f"AttributeHead needs embedding_dim, num_attributes >= 1, got "
                f"{embedding_dim}, {num_attributes}"
            )
        self.embedding_dim = embedding_dim
        self.num_attributes = num_attributes
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (embedding_dim, num_attributes), jnp.float32))

    def __call__(self, embedding: jax.Array) -> AttributeOutputs:
        """``embedding [B, N] -> (logits [B, A], probabilities [B, A])``, float32."""
        if embedding.ndim != 2 or embedding.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"AttributeHead expects embeddings [B, {self.embedding_dim}], "
                f"got {embedding.shape}"
            )
        logits = jnp.dot(embedding.astype(jnp.float32), self.kernel[...],
                         precision=jax.lax.Precision.HIGHEST)
        return AttributeOutputs(logits=logits, probabilities=jax.nn.sigmoid(logits))
