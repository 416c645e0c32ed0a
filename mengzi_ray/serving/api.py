"""The HTTP ingress: a FastAPI app served by the `Api` deployment, which composes Detector, Captioner and
Retriever by handle.

Routes: `GET /` (demo page), `GET /healthz`, `GET /v1/models`, `POST /v1/caption`, `POST /v1/search/images`,
`POST /v1/search/captions`, `GET /v1/gallery/images/{image_id}`; OpenAPI at `/openapi.json`, docs at `/docs`.
Image routes take JSON (base64 image, or precomputed regions) or a multipart upload (field `image`). Every
refusal is a 4xx JSON error (errors.py), every server fault a 5xx JSON error; a model call whose replica died is
retried once on another replica unless it may have been this request that killed it (see `Api._call`), and each model call has a server-side timeout (limits.call_timeout_s).
"""


import asyncio
import base64
import binascii
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from mengzi_ray.features.decode import DecodeError, decode_image_for
from mengzi_ray.serving.captioning import CaptionJob, RegionSet
from mengzi_ray.serving.errors import ApiError, BearerAuth, BodyLimitMiddleware, install_error_handlers
from mengzi_ray.serving.page import DEMO_PAGE
from mengzi_ray.serving.retrieval import SearchQuery
from mengzi_ray.serving.schemas import (
    Body,
    CaptionRequest,
    ImageInput,
    RegionsIn,
    SearchCaptionsRequest,
    SearchImagesRequest,
    component_schemas,
    request_body,
)
from mengzi_ray.serving.settings import LimitsSection

BodyT = TypeVar("BodyT", bound=Body)
DEATH_GRACE_S = 0.2  # how long a call that saw its replica die waits for other calls to report the same death
PRIVATE_INFO = frozenset({"model_dir", "gallery"})  # storage URIs in the deployments' info()
log = logging.getLogger("ray.serve")

app = FastAPI(
    title="mengzi_ray serving",
    version="1",
    description="Chinese image captioning and image-text retrieval with Mengzi-Oscar on Ray Serve.",
)
install_error_handlers(app)
# Set by each replica's Api.__init__ from limits.max_body_bytes (middleware must be added before the app starts).
_body_limit = {"bytes": LimitsSection().max_body_bytes}
app.add_middleware(BodyLimitMiddleware, max_bytes=lambda: _body_limit["bytes"])


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(component_schemas())
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


@dataclass
class ParsedImage:
    """An image route's input after parsing: a decoded image (with optional given boxes) or regions."""

    image: np.ndarray | None
    boxes: np.ndarray | None  # in the pixels of `image`
    regions: RegionSet | None
    region_boxes: list[list[float]] | None
    scale: float  # original size / size of `image` (> 1 when a large JPEG was decoded reduced)
    decode_ms: float


FEATURE_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
MAX_FEATURE_DIM = 8192  # far above Oscar's 2054; bounds what one region row may claim


def _region_array(regions: RegionsIn) -> np.ndarray:
    """(N, D) float32 from either request form; the base64 form is read with one buffer copy, no per-number
    Python work. Shape errors are 422s naming the field (the model's own D is checked by the deployment)."""
    if regions.features is not None:
        rows = regions.features
        if len({len(row) for row in rows}) > 1:
            raise ApiError(422, "bad_regions", "regions.features rows differ in length", "regions.features")
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), -1) if rows else np.zeros((0, 0), np.float32)
    count, dim = regions.shape or (0, 0)
    if not 0 < dim <= MAX_FEATURE_DIM:
        raise ApiError(422, "bad_regions", f"regions.shape[1]={dim} must be between 1 and {MAX_FEATURE_DIM}", "regions.shape")
    dtype = FEATURE_DTYPES[regions.dtype]
    expected = count * dim * dtype.itemsize
    # base64 length bounds the decoded size, so a lying shape is refused before anything is allocated
    if len(regions.features_b64 or "") > 4 * (-(-expected // 3)):
        raise ApiError(422, "bad_regions", f"regions.features_b64 is longer than shape {regions.shape} of {regions.dtype} "
                       f"needs ({expected} bytes)", "regions.features_b64")
    try:
        raw = base64.b64decode(regions.features_b64 or "", validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "bad_base64", "regions.features_b64 is not valid base64", "regions.features_b64") from None
    if len(raw) != expected:
        raise ApiError(422, "bad_regions", f"regions.features_b64 holds {len(raw)} bytes; shape {regions.shape} of "
                       f"{regions.dtype} needs {expected}", "regions.features_b64")
    return np.frombuffer(raw, dtype=dtype).reshape(count, dim).astype(np.float32)


async def _read_body(request: Request, model: type[BodyT]) -> tuple[BodyT, bytes | None]:
    """The JSON body as `model`, or a multipart form (file `image` + scalar fields) → (model, file bytes)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        if model is SearchImagesRequest:
            raise ApiError(415, "unsupported_media_type", "this route takes application/json")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # starlette/multipart raise several types for malformed forms
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "missing_image", "multipart body needs a file field `image`", "image")
        data = await upload.read()
        fields: dict[str, Any] = {}
        for key, value in form.items():
            if key == "image":
                continue
            if not isinstance(value, str) or not value.lstrip("-").isdigit():
                raise ApiError(422, "invalid_request", f"form field {key!r} must be an integer", key)
            fields[key] = int(value)
        fields["image_base64"] = ""
        return _validate(model, fields), data
    if not content_type.startswith("application/json"):
        raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    raw = await request.body()
    return await asyncio.to_thread(_parse_json, raw, model), None


def _parse_json(raw: bytes, model: type[BodyT]) -> BodyT:
    """Parse and validate a JSON body (in a worker thread: a body of JSON floats costs milliseconds)."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {exc}") from None
    return _validate(model, payload)


def _validate(model: type[BodyT], payload: Any) -> BodyT:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise ApiError(422, "invalid_request", message, field) from None


def _bounded(name: str, value: int, low: int, high: int, limit: str) -> int:
    if not low <= value <= high:
        raise ApiError(422, "out_of_range", f"{name}={value} must be between {low} and {high} ({limit})", name)
    return value


@serve.deployment(name="Api")
@serve.ingress(app)
class Api:
    def __init__(
        self,
        detector: DeploymentHandle,
        captioner: DeploymentHandle,
        retriever: DeploymentHandle,
        limits: LimitsSection,
        default_num_beams: int,
        auth_token_env: str,
        commit: str | None,
        allow_anonymous: bool = False,
        exif_orientation: bool = True,
        reduce_to: tuple[int, int] | None = None,
    ):
        self.detector, self.captioner, self.retriever = detector, captioner, retriever
        self.exif_orientation = exif_orientation
        self.reduce_to = reduce_to  # the detector's (test_min_size, test_max_size): large JPEGs decode reduced
        self.limits, self.default_num_beams, self.commit = limits, default_num_beams, commit
        self.auth = BearerAuth(auth_token_env, allow_anonymous)  # raises (the replica does not start) without a token
        _body_limit["bytes"] = limits.max_body_bytes
        self.deaths: dict[str | None, int] = {}  # replica actor id → calls of this ingress that saw it die

    async def _call(self, method: Any, *args: Any) -> Any:
        """One model call under the server's own limit (limits.call_timeout_s; Ray's proxy lets a client lift the
        HTTP timeout with `x-request-timeout-seconds`, this limit it cannot). A replica that could not be reached
        (ActorUnavailableError) is retried once; one that died mid-call is retried once only when other calls of
        this ingress died with it (a killed node, an OOM under load): a replica that died holding only this
        request may have been killed by it, and a retry would take down a second replica. Anything that is not
        the client's fault is a 503 JSON error."""
        name = getattr(getattr(method, "handle_options", None), "method_name", None) or "model call"
        try:
            async with asyncio.timeout(self.limits.call_timeout_s):
                try:
                    result = await method.remote(*args)
                except ActorUnavailableError:
                    result = await method.remote(*args)
                except RayActorError as exc:
                    if not await self._died_with_others(exc):
                        log.warning("%s: the replica died holding only this request; not retried", name)
                        raise ApiError(503, "model_unavailable", f"{name} failed (the replica died while it served "
                                       "this request; it is not retried, as it may be what killed it)") from None
                    result = await method.remote(*args)
        except TimeoutError:
            raise ApiError(503, "model_timeout", f"{name} did not answer within limits.call_timeout_s="
                           f"{self.limits.call_timeout_s}") from None
        except ApiError:
            raise
        except Exception as exc:  # replica died twice, backpressure, a deployment error: a server fault
            log.warning("%s failed: %s", name, type(exc).__name__)
            raise ApiError(503, "model_unavailable", f"{name} failed ({type(exc).__name__}); try again") from None
        if isinstance(result, ApiError):
            raise result
        return result

    async def _died_with_others(self, exc: RayActorError) -> bool:
        """Count this call against the dead replica, give the replica's other calls DEATH_GRACE_S to report the
        same death, and say whether any did. The count is kept (bounded), so a call that reaches a replica
        already known dead is retried at once."""
        if len(self.deaths) > 1024:
            self.deaths.clear()
        self.deaths[exc.actor_id] = self.deaths.get(exc.actor_id, 0) + 1
        if self.deaths[exc.actor_id] == 1:
            await asyncio.sleep(DEATH_GRACE_S)
        return self.deaths[exc.actor_id] > 1

    def _parse_image(self, body: ImageInput, upload: bytes | None) -> ParsedImage:
        """Regions or a decoded image from the request; runs in a worker thread (decoding a large image takes
        ~1 s of CPU, which must not stall the other requests on this replica's event loop)."""
        limit = self.limits.max_regions
        if body.regions is not None:
            _bounded("regions", max(body.regions.count, len(body.regions.tags)), 0, limit, "limits.max_regions")
            feats = _region_array(body.regions)
            return ParsedImage(None, None, RegionSet(feats, list(body.regions.tags)), body.regions.boxes, 1.0, 0.0)
        start = time.perf_counter()
        if upload is None:
            try:
                upload = base64.b64decode(body.image_base64 or "", validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(422, "bad_base64", "image_base64 is not valid base64", "image_base64") from None
        try:
            decoded = decode_image_for(upload, self.limits.max_pixels, self.reduce_to, exif_orientation=self.exif_orientation)
        except DecodeError as exc:
            raise ApiError(422, "bad_image", f"image: {exc}", "image") from None
        boxes = None
        if body.boxes is not None:
            _bounded("boxes", len(body.boxes), 1, limit, "limits.max_regions")
            boxes = np.asarray(body.boxes, dtype=np.float32) / decoded.scale  # into the reduced image's pixels
        return ParsedImage(decoded.pixels, boxes, None, None, decoded.scale, (time.perf_counter() - start) * 1000)

    async def _regions(self, parsed: ParsedImage) -> tuple[RegionSet, dict[str, Any]]:
        """Region set for the models and the JSON the page draws (boxes, labels, tags, size)."""
        if parsed.regions is not None:
            return parsed.regions, {"boxes": parsed.region_boxes, "tags": parsed.regions.tags, "detect_ms": 0.0}
        start = time.perf_counter()
        found = await self._call(self.detector.detect, (parsed.image, parsed.boxes))
        scale = parsed.scale
        return found.regions, {
            "width": round(found.width * scale),
            "height": round(found.height * scale),
            "boxes": [
                {"box": [v * scale for v in box] if scale != 1.0 else box, "label": label, "tag": tag, "score": score}
                for box, label, tag, score in zip(found.boxes, found.labels, found.regions.tags, found.scores)
            ],
            "tags": found.regions.tags,
            "detect_ms": (time.perf_counter() - start) * 1000,
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(DEMO_PAGE)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "auth": self.auth.enabled}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """What is served. Storage URIs (model dirs, gallery) and the commit only to an authenticated caller: an
        anonymous demo does not reveal where the models live."""
        self.auth.check(request)
        info = {
            "captioner": await self._call(self.captioner.info),
            "retriever": await self._call(self.retriever.info),
            "detector": await self._call(self.detector.info),
            "limits": self.limits.model_dump(),
            "default_num_beams": self.default_num_beams,
            "commit": self.commit,
        }
        if not self.auth.enabled:
            info["commit"] = None
            for part in ("captioner", "retriever", "detector"):
                info[part] = {k: v for k, v in info[part].items() if k not in PRIVATE_INFO}
        return info

    @app.post("/v1/caption", openapi_extra=request_body(CaptionRequest))
    async def caption(self, request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        self.auth.check(request)
        body, upload = await _read_body(request, CaptionRequest)
        beams = _bounded("num_beams", body.num_beams or self.default_num_beams, 1, self.limits.max_beams, "limits.max_beams")
        top_n = _bounded("top_n", body.top_n, 1, beams, "at most num_beams")
        parsed = await asyncio.to_thread(self._parse_image, body, upload)
        regions, drawn = await self._regions(parsed)
        caption_start = time.perf_counter()
        result = await self._call(self.captioner.caption, CaptionJob(regions, beams, top_n))
        detect_ms = drawn.pop("detect_ms")
        return {
            "captions": [{"text": text, "score": score} for text, score in result.captions],
            **drawn,
            "num_beams": beams,
            "regions_used": result.regions_used,
            "batch_size": result.batch_size,
            "timings_ms": {
                "decode": parsed.decode_ms,
                "detect": detect_ms,
                "caption": (time.perf_counter() - caption_start) * 1000,
                "model": result.model_seconds * 1000,
                "total": (time.perf_counter() - start) * 1000,
            },
        }

    async def _search(self, search: SearchQuery, start: float, **extra: Any) -> dict[str, Any]:
        hits = await self._call(self.retriever.search, search)
        return {**extra, "results": hits, "timings_ms": {"total": (time.perf_counter() - start) * 1000}}

    @app.post("/v1/search/images", openapi_extra=request_body(SearchImagesRequest))
    async def search_images(self, request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        self.auth.check(request)
        body, _ = await _read_body(request, SearchImagesRequest)
        text = body.text.strip()
        _bounded("text length", len(text), 1, self.limits.max_text_chars, "limits.max_text_chars")
        query = SearchQuery(k=_bounded("k", body.k, 1, self.limits.max_k, "limits.max_k"), text=text)
        return await self._search(query, start, query=text)

    @app.post("/v1/search/captions", openapi_extra=request_body(SearchCaptionsRequest))
    async def search_captions(self, request: Request) -> dict[str, Any]:
        start = time.perf_counter()
        self.auth.check(request)
        body, upload = await _read_body(request, SearchCaptionsRequest)
        k = _bounded("k", body.k, 1, self.limits.max_k, "limits.max_k")
        regions, drawn = await self._regions(await asyncio.to_thread(self._parse_image, body, upload))
        return await self._search(SearchQuery(k=k, regions=regions), start, tags=drawn["tags"])

    @app.get("/v1/gallery/images/{image_id:path}")
    async def gallery_image(self, image_id: str, request: Request) -> Response:
        self.auth.check(request)
        data = await self._call(self.retriever.image_bytes, image_id)
        if data is None:
            raise ApiError(404, "unknown_image", f"no gallery image {image_id!r} under gallery.images_root", "image_id")
        kind = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg" if data.startswith(b"\xff\xd8") else "application/octet-stream"
        return Response(data, media_type=kind)
