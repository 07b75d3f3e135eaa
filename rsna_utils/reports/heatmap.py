"""Where the model looks: class-activation maps on the model input, mapped back to the original
DICOM pixels.

A view goes original pixels -> crop box -> resize (aspect kept or stretched) -> mirror when the
chest wall was on the right -> black padding at the right / bottom (the preprocessed image, the
"canvas", `preprocess.preprocess_image`) -> the model input's resize with padding
(`roi.resize` "pad", as in training and `scoring.raw_batch`) to the model's input. Every step
is an axis-aligned scale, shift or mirror, so the whole chain is one affine map per axis
(`ViewGeometry`), inverted exactly.

Coordinates are continuous: pixel column i covers [i, i + 1) and its centre is i + 0.5, in every
image of the chain (OpenCV's resize uses the same half-pixel convention). A point reported as an
original pixel is (column x, row y) of the DICOM as stored, before any flip.

Class-activation maps from gradients, three ways (`CAM_METHODS`), on a feature map chosen from
timm's `feature_info` (so whatever the pooling: GeM, avg, max; logit 0 is the cancer when
auxiliary heads exist): Grad-CAM (Selvaraju et al. 2017: channel weights = the cancer logit's
gradient averaged over space), HiResCAM (Draelos & Carin 2020: gradient x activation per cell,
summed over channels; the exact share of each cell in the logit when the head is linear after
average pooling) and LayerCAM (Jiang et al. 2021: the positive gradient x activation). The
default is HiResCAM on the stride-16 stage: Grad-CAM on the last, stride-32 map localised
synthetic lesions far worse (its channel-averaged weights smear a lesion over a 3x3-cell blob
of an 8x4 grid; BENCHMARKS.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from rsna_utils.core.errors import RsnaError
from rsna_utils.core.table import dicom_path
from rsna_utils.image import roi

# ----------------------------------------------------------------------------------------
# Geometry: original pixels <-> preprocessed canvas <-> model input
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViewGeometry:
    """How one view's original pixels were placed on the preprocessed canvas."""
    rows: int                              # original image (DICOM Rows, Columns)
    cols: int
    box: tuple[int, int, int, int]         # crop (y0, x0, y1, x1) in original pixels
    flipped: bool                          # mirrored after the resize
    canvas: tuple[int, int]                # preprocessed image (height, width): the config's size
    content: tuple[int, int]               # the resized crop at the canvas's top left

    @classmethod
    def from_meta(cls, meta: dict, cfg) -> "ViewGeometry":
        """From `preprocess_image`'s meta dict (or a meta.csv row) and its PreprocessConfig."""
        try:
            box = tuple(int(meta[k]) for k in ("crop_y0", "crop_x0", "crop_y1", "crop_x1"))
            rows, cols, flipped = int(meta["rows"]), int(meta["columns"]), meta["flipped"]
        except KeyError as e:
            raise RsnaError(f"preprocessing meta lacks {e.args[0]!r}: the heatmap needs the crop "
                            "box, the flip and the original size (preprocess_image's meta dict)") from None
        if isinstance(flipped, str):        # read back from meta.csv
            flipped = flipped.strip().lower() in ("true", "1")
        y0, x0, y1, x1 = box
        content = roi.fit_shape(y1 - y0, x1 - x0, tuple(cfg.size), cfg.resize_mode)
        return cls(rows, cols, box, bool(flipped), tuple(cfg.size), content)

    def _axes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """((ax, bx), (ay, by)): canvas = a * original + b, per axis (continuous coordinates)."""
        y0, x0, y1, x1 = self.box
        ch, cw = self.content
        sx, sy = cw / (x1 - x0), ch / (y1 - y0)
        if self.flipped:      # mirrored within the resized crop: u -> cw - u
            return (-sx, cw + sx * x0), (sy, -sy * y0)
        return (sx, -sx * x0), (sy, -sy * y0)

    def original_to_canvas(self, x, y):
        (ax, bx), (ay, by) = self._axes()
        return ax * np.asarray(x, float) + bx, ay * np.asarray(y, float) + by

    def canvas_to_original(self, x, y):
        (ax, bx), (ay, by) = self._axes()
        return (np.asarray(x, float) - bx) / ax, (np.asarray(y, float) - by) / ay

    def in_content(self, x, y):
        """Whether canvas points fall on the image (not on the black padding)."""
        x, y = np.asarray(x, float), np.asarray(y, float)
        return (x >= 0) & (y >= 0) & (x < self.content[1]) & (y < self.content[0])

    def canvas_to_original_pixel(self, col: int, row: int) -> tuple[int, int]:
        """Canvas pixel (column, row) -> the original pixel (column x, row y) under its centre."""
        x, y = self.canvas_to_original(col + 0.5, row + 0.5)
        return (int(np.clip(np.floor(x), 0, self.cols - 1)),
                int(np.clip(np.floor(y), 0, self.rows - 1)))

    def canvas_to_original_image(self, canvas_map: np.ndarray, scale: float = 1.0,
                                 interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        """A map on the canvas -> the original image's grid (times `scale`, e.g. 0.25 for a
        figure), 0 outside the crop box."""
        if canvas_map.shape[:2] != self.canvas:
            raise ValueError(f"map of shape {canvas_map.shape[:2]}, canvas is {self.canvas}")
        oh, ow = max(1, round(self.rows * scale)), max(1, round(self.cols * scale))
        (ax, bx), (ay, by) = self._axes()
        # destination pixel index j (centre j + 0.5 at `scale`) -> source pixel index:
        # src + 0.5 = a * (j + 0.5) / scale + b
        m = np.array([[ax / scale, 0, ax * 0.5 / scale + bx - 0.5],
                      [0, ay / scale, ay * 0.5 / scale + by - 0.5]], np.float64)
        src = np.ascontiguousarray(canvas_map, np.float32)
        out = cv2.warpAffine(src, m, (ow, oh), flags=interpolation | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        y0, x0, y1, x1 = self.box
        keep = np.zeros((oh, ow), bool)
        keep[int(np.floor(y0 * scale)):int(np.ceil(y1 * scale)),
             int(np.floor(x0 * scale)):int(np.ceil(x1 * scale))] = True
        out[~keep] = 0
        return out


def input_content(canvas: tuple[int, int], input_size: tuple[int, int]) -> tuple[int, int]:
    """Where the model input's resize (`roi.resize` "pad") puts the canvas: (height, width) at its
    top left (aspect kept, black padding)."""
    return roi.fit_shape(canvas[0], canvas[1], tuple(input_size), "pad")


def cam_to_canvas(cam: np.ndarray, input_size: tuple[int, int], canvas: tuple[int, int],
                  interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
    """A CAM over the whole model input (its feature grid, fh x fw) -> the canvas grid.

    Feature cell (i, j) stands for the input tile rows [i, i + 1) * H / fh, columns likewise.
    (The arithmetic receptive-field centres differ by up to half a tile, 32j for a ResNet's
    stride-32 map and 32j + 31 with TensorFlow SAME padding, but mapping cells there halved
    the pointing-game hit rate of a trained tf_efficientnet_lite0: the effective receptive
    field is wide and pulled towards the image's centre.) Bicubic interpolation: the maximum
    of a bilinear upsampling always sits on a cell centre, a bicubic one can fall between
    cells. The border is mirrored about the edge cells (a replicated border would shift a peak
    near the edge outwards)."""
    fh, fw = cam.shape
    ih, iw = input_size
    sh, sw = input_content(canvas, input_size)
    hp, wp = canvas
    # canvas pixel centre (j + 0.5) -> input (j + 0.5) * sw / wp -> cam (.) * fw / iw
    kx, ky = sw / wp * fw / iw, sh / hp * fh / ih
    m = np.array([[kx, 0, 0.5 * kx - 0.5], [0, ky, 0.5 * ky - 0.5]], np.float64)
    out = cv2.warpAffine(np.ascontiguousarray(cam, np.float32), m, (wp, hp),
                         flags=interpolation | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT_101)
    return np.maximum(out, 0)


def canvas_peak(canvas_map: np.ndarray, geom: ViewGeometry) -> tuple[int, int]:
    """(column, row) of the largest value on the image part of the canvas (padding ignored)."""
    ch, cw = geom.content
    part = canvas_map[:ch, :cw]
    r, c = np.unravel_index(int(np.argmax(part)), part.shape)
    return int(c), int(r)


# ----------------------------------------------------------------------------------------
# Grad-CAM
# ----------------------------------------------------------------------------------------

CAM_METHODS = ("gradcam", "hirescam", "layercam")
# HiResCAM on the stride-16 stage: on held-out synthetic lesions (tf_efficientnet_lite0 at
# 256x128) its peak fell on the lesion box for 41 of 42 views, Grad-CAM on the last map for 11
# (BENCHMARKS.md, "Do the heatmaps point at the lesions?")
DEFAULT_METHOD, DEFAULT_LAYER = "hirescam", -2


def grad_cam(model, x, method: str = DEFAULT_METHOD, layer: int = DEFAULT_LAYER) -> tuple:
    """(cams, logits) for a batch: cams (N, fh, fw) float32 >= 0 on a feature map's grid,
    logits (N,) the cancer logit. Device-agnostic: runs where `model` and `x` are.

    layer -1: the last feature map (stride 32); the backbone runs without a graph (no_grad,
    autocast on CUDA) and only the head (pooling + classifier) is differentiated with respect
    to it: a 1536x768 batch costs little more memory than plain inference. layer -2: the
    stage before it (stride 16, timm's `feature_info`), a grid twice as fine, through a hook
    and a full backward. method: gradcam (channel weights = mean gradient), hirescam
    (gradient x activation per cell), layercam (positive gradient x activation per cell)."""
    import torch

    from rsna_utils.learn.checkpoint import cancer_logit
    from rsna_utils.learn.device import half_dtype
    if method not in CAM_METHODS:
        raise RsnaError(f"CAM method {method!r}: choose {', '.join(CAM_METHODS)}")
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise RsnaError(f"{type(model).__name__}: Grad-CAM needs a timm model with "
                        "forward_features / forward_head (the models `rsna train` writes)")
    cuda = x.device.type == "cuda"
    dtype = half_dtype(x.device)
    if layer == -1:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=cuda):
            feats = model.forward_features(x)
        _check_map(model, feats)
        feats = feats.float().detach().requires_grad_(True)
        with torch.enable_grad():
            logits = cancer_logit(model.forward_head(feats))
            (grads,) = torch.autograd.grad(logits.sum(), feats)
    else:
        info = getattr(model, "feature_info", None)
        try:
            name = info[layer]["module"]
        except (TypeError, IndexError, KeyError):
            raise RsnaError(f"{type(model).__name__}: no feature stage {layer} (timm "
                            "feature_info); use layer=-1, the last feature map") from None
        seen = {}

        def start_graph(mod, inp, out):   # the graph starts here: no backward through the stem
            seen["feats"] = out.detach().requires_grad_(True)
            return seen["feats"]

        handle = model.get_submodule(name).register_forward_hook(start_graph)
        wanted = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        try:
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=cuda):
                logits = cancer_logit(model(x))
                feats = seen["feats"]
                _check_map(model, feats)
                (grads,) = torch.autograd.grad(logits.sum(), feats)
        finally:
            handle.remove()
            for p, w in zip(model.parameters(), wanted):
                p.requires_grad_(w)
        feats, grads = feats.float(), grads.float()
    feats = feats.detach()
    if method == "gradcam":
        cams = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * feats).sum(dim=1))
    elif method == "hirescam":
        cams = torch.relu((grads * feats).sum(dim=1))
    else:
        cams = torch.relu((torch.relu(grads) * feats).sum(dim=1))
    return cams.float(), logits.detach().float()


def _check_map(model, feats) -> None:
    if feats.ndim != 4:
        raise RsnaError(f"{type(model).__name__}: the feature map has shape {tuple(feats.shape)}, "
                        "not (N, C, H, W); Grad-CAM needs a convolutional backbone")


def explain_batch(imgs: list[np.ndarray], ens, method: str = DEFAULT_METHOD,
                  layer: int = DEFAULT_LAYER,
                  tta: bool | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Preprocessed images (canvas-sized uint8 / uint16, as `preprocess_image` returns) ->
    (scores (N,), heat maps on the canvas grid).

    Scores are the models' sigmoids averaged as `rsna predict` averages them (per recipe, then
    the recipes: `oof.model_weights`; with `tta`, each model's score is the mean of the image
    and its mirror, as `rsna predict --tta`, and so is its map: the mirror's CAM is mirrored
    back and averaged in, weighted by the mirror's score). Each model's CAM is scaled to its own
    maximum for that view and weighted by that model's score, then the models are averaged
    with the same weights: heat lies in [0, 1], is independent of the batch, no model
    dominates by the size of its gradients, and a view the models call negative glows faintly.
    A breast-level model's heat is that of the view read alone; its vote, which needs the
    breast's other views, is `pooled_votes`'s. `ens`: the `scoring.LoadedEnsemble`; `tta` None:
    its own."""
    import torch

    from rsna_utils.learn.checkpoint import mirrored
    tta = ens.tta if tta is None else tta
    canvas, device = tuple(ens.pre["size"]), ens.device
    n = len(imgs)
    scores = np.zeros(n, np.float64)
    heat = [np.zeros(canvas, np.float32) for _ in range(n)]
    for m, w in zip(ens.models, ens.weights):
        x = ens.input_batch(imgs, m).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        size = tuple(x.shape[-2:])
        views = [grad_cam(m.model, x, method, layer)]
        if tta:      # the mirror's CAM, mirrored back onto the image's grid
            cams_f, logits_f = grad_cam(m.model, mirrored(x), method, layer)
            views.append((mirrored(cams_f), logits_f))
        for cams, logits in views:
            p = torch.sigmoid(logits.float()).cpu().numpy()
            if getattr(m, "level", "image") == "image":   # a breast model's vote: `pooled_votes`
                scores += w * p / len(views)
            cams = cams.cpu().numpy()
            for i in range(n):
                c = cam_to_canvas(cams[i], size, canvas)
                top = float(c.max())
                if top > 0:
                    heat[i] += (w * p[i] / top / len(views)) * c
    return scores, heat


def pooled_votes(imgs: list[np.ndarray], prediction_ids: list, ens,
                 tta: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The breast-level members' part of each view's score (its breast's pooled probability,
    weighted by the member's vote, as `rsna predict` adds it) and each view's attention weight
    (NaN without breast-level members), for the readable views of one exam."""
    import pandas as pd

    import torch

    from rsna_utils.infer.scoring import add_breast_members, view_features
    n = len(imgs)
    tta = ens.tta if tta is None else tta
    with torch.inference_mode():
        feats = {id(m): [view_features(m.model, ens.input_batch(imgs, m).to(ens.device), tta)]
                 for m in ens.models if getattr(m, "level", "image") == "breast"}
    if not feats or not n:
        return np.zeros(n), np.full(n, np.nan)
    ids = pd.DataFrame({"prediction_id": list(prediction_ids)})
    return add_breast_members(np.zeros(n, np.float32), [""] * n, ids, ens.models,
                              ens.weights, feats, ens.device)


# ----------------------------------------------------------------------------------------
# Do the heatmaps point at the lesions? (synthetic data: lesions.csv holds the truth)
# ----------------------------------------------------------------------------------------

MALIGNANT_KINDS = ("mass", "calc")      # lesions.csv also lists "benign" look-alikes


def pointing_game(views, lesions, images, threshold: float | None = None,
                  margin: float = 0.02) -> dict:
    """Share of detected lesion views whose heat peak falls on the lesion, and the chance level.

    views: heatmaps.csv rows (image_id, patient_id, score, peak_x, peak_y). lesions: the
    synthetic generator's lesions.csv (image_id, kind, y0, x0, y1, x1 in original pixels).
    A view is a lesion view when it carries a mass or calcification cluster; it is detected
    when its score is >= `threshold`, or, without one, when it is among the k best-scored
    views, k = the number of lesion views. A hit: the peak inside a lesion box grown by
    `margin` x the image's longer side on every side. Chance: the share of the breast (its
    mask on the windowed image) inside the grown boxes, the hit rate of a uniformly random
    point in the breast, averaged over the same views.
    """
    import pandas as pd

    from rsna_utils.dicom.header import read_header
    from rsna_utils.dicom.reader import decode_pixels
    from rsna_utils.image.voi import apply_voi_lut
    les = lesions[lesions["kind"].isin(MALIGNANT_KINDS)]
    boxes = {iid: d[["y0", "x0", "y1", "x1"]].to_numpy() for iid, d in les.groupby("image_id")}
    v = views.dropna(subset=["score"]).copy()
    v["lesion"] = v["image_id"].isin(boxes)
    n_lesion = int(v["lesion"].sum())
    if n_lesion == 0:
        raise RsnaError("no view with a planted mass or calcification among the explained "
                        "views; explain positive synthetic patients (rsna synth --positive-rate)")
    if threshold is None:
        cut = np.sort(v["score"].to_numpy())[::-1][n_lesion - 1]
        detected = v["score"] >= cut
    else:
        detected = v["score"] >= threshold
    rows = []
    for r in v[v["lesion"] & detected].itertuples():
        h = read_header(dicom_path(images, r.patient_id, r.image_id))
        px, _ = decode_pixels(h)
        k = int(np.ceil(max(px.shape) / 512))
        shown, _ = apply_voi_lut(roi.subsample(px, 512), h)
        breast = roi.breast_mask(shown)
        m = margin * max(px.shape)
        grown = [(y0 - m, x0 - m, y1 + m, x1 + m) for y0, x0, y1, x1 in boxes[r.image_id]]
        hit = pd.notna(r.peak_x) and any(y0 <= r.peak_y + 0.5 <= y1 and x0 <= r.peak_x + 0.5 <= x1
                                         for y0, x0, y1, x1 in grown)
        yy, xx = np.mgrid[0:breast.shape[0], 0:breast.shape[1]]
        yy, xx = (yy + 0.5) * k, (xx + 0.5) * k            # subsample pixel centres, original
        inside = np.zeros(breast.shape, bool)
        for y0, x0, y1, x1 in grown:
            inside |= (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)
        chance = float((inside & breast).sum() / max(1, breast.sum()))
        rows.append(dict(image_id=r.image_id, score=r.score, peak_x=r.peak_x, peak_y=r.peak_y,
                         hit=bool(hit), chance=chance, margin_px=m))
    per_view = pd.DataFrame(rows, columns=["image_id", "score", "peak_x", "peak_y", "hit",
                                           "chance", "margin_px"])
    n = len(per_view)
    return dict(hit_rate=float(per_view["hit"].mean()) if n else float("nan"),
                chance=float(per_view["chance"].mean()) if n else float("nan"),
                views=n, lesion_views=n_lesion, hits=int(per_view["hit"].sum()),
                per_view=per_view)
