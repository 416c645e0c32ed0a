"""Request bodies of the HTTP API (JSON and multipart) and their OpenAPI entries.

Bounds that come from the app settings (beams, k, text length, regions) are checked by the ingress against
`LimitsSection`; the models here check only shape and type, so the served schema stays valid for any config.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import models_json_schema

Finite = Annotated[float, Field(allow_inf_nan=False)]
Box = Annotated[list[Finite], Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in original pixels")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegionsIn(Body):
    """Precomputed regions (e.g. a row of a feature dataset): N Oscar vectors and N Chinese tags.

    The vectors come either as JSON numbers (`features`) or, compactly, as the raw array (`features_b64` with
    `shape` and `dtype`): about a fifth of the bytes, and the server reads it without touching each number."""

    features: list[list[Finite]] | None = Field(None, description="(N, img_feature_dim) region vectors, detector order")
    features_b64: str | None = Field(
        None,
        description="base64 (standard alphabet) of the (N, img_feature_dim) array, row-major, little-endian `dtype`; "
        "e.g. numpy: base64.b64encode(a.astype('<f4').tobytes())",
    )
    shape: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=2, max_length=2, description="[N, img_feature_dim] of features_b64"
    )
    dtype: Literal["float32", "float16"] = Field("float32", description="element type of features_b64")
    tags: list[str] = Field(..., description="N Chinese tags, one per region")
    boxes: list[Box] | None = Field(None, description="N boxes, echoed back for drawing")

    @model_validator(mode="after")
    def _one_form(self) -> "RegionsIn":
        if (self.features is None) == (self.features_b64 is None):
            raise ValueError("give exactly one of features (JSON numbers) or features_b64 (with shape)")
        if (self.features_b64 is None) != (self.shape is None):
            raise ValueError("shape goes with features_b64, and features_b64 needs it")
        if self.boxes is not None and len(self.boxes) != len(self.tags):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.tags)} tags")
        return self

    @property
    def count(self) -> int:
        """N as the request states it (rows of features, or shape[0])."""
        return len(self.features) if self.features is not None else int(self.shape[0])  # type: ignore[index]


class ImageInput(Body):
    """Exactly one of an image (base64 of the encoded file) or precomputed regions."""

    image_base64: str | None = Field(None, description="base64 (standard alphabet) of a JPEG/PNG/... file")
    boxes: list[Box] | None = Field(None, description="given boxes for the image (given_boxes detector)")
    regions: RegionsIn | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "ImageInput":
        if (self.image_base64 is None) == (self.regions is None):
            raise ValueError("give exactly one of image_base64 or regions")
        if self.regions is not None and self.boxes is not None:
            raise ValueError("boxes go with image_base64; precomputed regions carry their own boxes")
        return self


class CaptionRequest(ImageInput):
    num_beams: int | None = Field(None, description="beam width (default from the server config; 1 = greedy)")
    top_n: int = Field(1, description="captions returned, best first (at most num_beams)")


class SearchCaptionsRequest(ImageInput):
    k: int = Field(10, description="captions returned")


class SearchImagesRequest(Body):
    text: str = Field(..., description="Chinese query sentence")
    k: int = Field(10, description="images returned")


def _multipart(extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary", "description": "the image file"}, **extra},
    }


UPLOAD_FIELDS = {
    "CaptionRequest": {"num_beams": {"type": "integer"}, "top_n": {"type": "integer"}},
    "SearchCaptionsRequest": {"k": {"type": "integer"}},
}


def request_body(model: type[Body]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads its body itself: JSON `model`, or multipart for image routes."""
    content: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    if model.__name__ in UPLOAD_FIELDS:
        content["multipart/form-data"] = {"schema": _multipart(UPLOAD_FIELDS[model.__name__])}
    return {"requestBody": {"required": True, "content": content}}


def component_schemas() -> dict[str, Any]:
    """JSON schemas of every request model, with references into #/components/schemas."""
    _, top = models_json_schema(
        [(m, "validation") for m in (CaptionRequest, SearchCaptionsRequest, SearchImagesRequest)],
        ref_template="#/components/schemas/{model}",
    )
    return top.get("$defs", {})
