"""`POST /{model}/embed`: the pooled features of each image, as mmpretrain's `extract_feat` gives them.

The same batcher, deadlines, errors and metrics as /predict (route label `embed`): a forward computes
the features and the probabilities together, so an embedding and a prediction share a batch.
"""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from service.api.accounting import counted
from service.api.predict import render, run_images
from service.api.schemas import ERROR_RESPONSES, PREDICT_REQUEST_BODY, Embeddings
from service.engine import Engine

router = APIRouter(tags=["embedding"])

Normalize = Annotated[
    bool, Query(description="scale each embedding to unit L2 norm (cosine similarity by dot product)")
]


@router.post(
    "/{model}/embed",
    summary="Embed images (pooled features)",
    response_model=Embeddings,
    responses=ERROR_RESPONSES,
    openapi_extra=PREDICT_REQUEST_BODY,
)
async def embed_images(model: str, request: Request, normalize: Normalize = False) -> Response:
    async def work(engine: Engine) -> Response:
        pipeline = engine.lookup(model)
        results = await run_images(request, engine, pipeline)
        features = torch.stack([r.features for r in results])
        if normalize:
            features = torch.nn.functional.normalize(features, p=2.0, dim=1)
        return render(
            {
                "model": pipeline.name,
                "dim": int(features.shape[1]),
                "normalized": normalize,
                "embeddings": features.tolist(),
            }
        )

    return await counted(request, model, "embed", work)
