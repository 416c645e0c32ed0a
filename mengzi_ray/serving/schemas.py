"""Request bodies of the HTTP API (JSON and multipart) and their OpenAPI entries.

Bounds that come from the app settings (beams, k, text length, regions) are checked by the ingress against
`LimitsSection`; the models here check only shape and type, so the served schema stays valid for any config.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import models_json_schema

Finite = Annotated[float, Field(allow_inf_nan=False)]
Box = Annotated[list[Finite], Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in original pixels")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RegionsIn(Body):
    """Precomputed regions (e.g. a row of a feature dataset): N Oscar vectors and N Chinese tags."""

    features: list[list[Finite]] = Field(..., description="(N, img_feature_dim) region vectors, detector order")
    tags: list[str] = Field(..., description="N Chinese tags, one per region")
    boxes: list[Box] | None = Field(None, description="N boxes, echoed back for drawing")

    @model_validator(mode="after")
    def _boxes_match(self) -> "RegionsIn":
        if self.boxes is not None and len(self.boxes) != len(self.tags):
            raise ValueError(f"{len(self.boxes)} boxes but {len(self.tags)} tags")
        return self


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
