"""Where the model looks: Grad-CAM on the model input, mapped back to the original DICOM pixels.

A view goes original pixels -> crop box -> resize (aspect kept or stretched) -> mirror when the
chest wall was on the right -> black padding at the right / bottom (the preprocessed image, the
"canvas", `preprocess.preprocess_image`) -> `data.model_input`'s resize with padding to the
model's input. Every step is an axis-aligned scale, shift or mirror, so the whole chain is one
affine map per axis (`ViewGeometry`), inverted exactly.

Coordinates are continuous: pixel column i covers [i, i + 1) and its centre is i + 0.5, in every
image of the chain (OpenCV's resize uses the same half-pixel convention). A point reported as an
original pixel is (column x, row y) of the DICOM as stored, before any flip.

Grad-CAM (Selvaraju et al. 2017): the cancer logit's gradient with respect to the last feature
map, averaged over space, weights that map's channels; the ReLU of the weighted sum is the
class-activation map. It needs only timm's `forward_features` / `forward_head` split, so it works
whatever the pooling (GeM, avg, max) and with auxiliary heads (logit 0 is the cancer).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from rsna_utils import roi
from rsna_utils.errors import RsnaError


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
    """Where `data.model_input` puts the canvas inside the model input: (height, width) at its
    top left (aspect kept, black padding)."""
    return roi.fit_shape(canvas[0], canvas[1], tuple(input_size), "pad")


def cam_to_canvas(cam: np.ndarray, input_size: tuple[int, int], canvas: tuple[int, int],
                  interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
    """A CAM over the whole model input (its feature grid, fh x fw) -> the canvas grid.

    Feature cell (i, j) covers model-input rows [i, i + 1) * H / fh (a stride-s network's
    receptive-field centres sit there). Bicubic interpolation: the maximum of a bilinear
    upsampling always sits on a cell centre, a bicubic one can fall between cells. The border
    is mirrored about the edge cells (a replicated border would shift a peak near the edge
    outwards)."""
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

def grad_cam(model, x) -> tuple:
    """(cams, logits) for a batch: cams (N, fh, fw) float32 >= 0 on the last feature map's grid,
    logits (N,) the cancer logit. Device-agnostic: runs where `model` and `x` are.

    The backbone runs without a graph (no_grad, autocast on CUDA); only the head (pooling +
    classifier) is differentiated, with respect to the feature map: a 1536x768 batch costs
    little more memory than plain inference."""
    import torch

    from rsna_utils.train import cancer_logit
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise RsnaError(f"{type(model).__name__}: Grad-CAM needs a timm model with "
                        "forward_features / forward_head (the models `rsna train` writes)")
    cuda = x.device.type == "cuda"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else None
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=cuda):
        feats = model.forward_features(x)
    if feats.ndim != 4:
        raise RsnaError(f"{type(model).__name__}: forward_features gave shape {tuple(feats.shape)},"
                        " not a (N, C, H, W) feature map; Grad-CAM needs a convolutional backbone")
    feats = feats.float().detach().requires_grad_(True)
    with torch.enable_grad():
        logits = cancer_logit(model.forward_head(feats))
        (grads,) = torch.autograd.grad(logits.sum(), feats)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * feats.detach()).sum(dim=1))
    return cams.float(), logits.detach().float()


def explain_batch(imgs: list[np.ndarray], models: list, canvas: tuple[int, int],
                  channels: int, device) -> tuple[np.ndarray, list[np.ndarray]]:
    """Preprocessed images (canvas-sized uint8 / uint16, as `preprocess_image` returns) ->
    (scores (N,), heat maps on the canvas grid).

    Scores are the mean sigmoid over the models (as `rsna predict` without TTA). Each model's
    CAM is scaled to its own maximum for that view and weighted by that model's score, then
    the models are averaged: heat lies in [0, 1], is independent of the batch, no model
    dominates by the size of its gradients, and a view the models call negative glows faintly."""
    import torch

    from rsna_utils.predict import batch_input
    n = len(imgs)
    scores = np.zeros(n, np.float64)
    heat = [np.zeros(canvas, np.float32) for _ in range(n)]
    for m in models:
        x = batch_input(imgs, m, channels, canvas).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        cams, logits = grad_cam(m.model, x)
        p = torch.sigmoid(logits).cpu().numpy()
        scores += p
        cams = cams.cpu().numpy()
        size = tuple(x.shape[-2:])
        for i in range(n):
            c = cam_to_canvas(cams[i], size, canvas)
            top = float(c.max())
            if top > 0:
                heat[i] += (p[i] / top / len(models)) * c
    return scores / len(models), heat
