"""Heatmaps: the geometry from original DICOM pixels to the model input and back, Grad-CAM on
every backbone of the plans, and (slow) the pointing game on synthetic lesions."""
import numpy as np
import pytest
import torch

from rsna_utils.image.preprocess import PreprocessConfig, preprocess_image
from rsna_utils.reports.heatmap import ViewGeometry, cam_to_canvas, canvas_peak, grad_cam, input_content
from rsna_utils.sources import synth


def _geometry(flipped=False, size=(128, 128), mode="pad"):
    meta = dict(rows=400, columns=300, crop_y0=50, crop_x0=20, crop_y1=350, crop_x1=260,
                flipped=flipped)
    return ViewGeometry.from_meta(meta, PreprocessConfig(size=size, resize_mode=mode))


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("size,mode", [((128, 128), "pad"), ((64, 128), "pad"),
                                       ((100, 60), "stretch")])
def test_points_round_trip_through_crop_resize_flip_and_pad(flipped, size, mode):
    g = _geometry(flipped, size, mode)
    xs, ys = np.array([20.1, 259.9, 100.3, 140.0]), np.array([50.1, 349.9, 77.7, 200.0])
    cx, cy = g.original_to_canvas(xs, ys)
    assert g.in_content(cx, cy).all()
    bx, by = g.canvas_to_original(cx, cy)
    np.testing.assert_allclose(bx, xs, atol=1e-9)
    np.testing.assert_allclose(by, ys, atol=1e-9)
    # the crop's top-left corner goes to the canvas's left edge, or its right content edge
    # when mirrored; the content fills one side of the canvas when padded
    ch, cw = g.content
    x0, y0 = g.original_to_canvas(20, 50)
    assert (float(x0), float(y0)) == ((cw, 0.0) if flipped else (0.0, 0.0))
    if mode == "pad":
        assert ch == size[0] or cw == size[1]
        assert abs(ch / cw - 300 / 240) < 0.02      # aspect kept
    else:
        assert (ch, cw) == size
    # a point on the padding is not on the image
    assert not g.in_content(size[1] + 0.5, 0.5) and (cw == size[1] or not g.in_content(cw + 0.5, 0.5))


def test_meta_csv_strings_are_read():
    g = ViewGeometry.from_meta(dict(rows="400", columns="300", crop_y0="0", crop_x0="0",
                                    crop_y1="400", crop_x1="300", flipped="True"),
                               PreprocessConfig(size=(100, 100)))
    assert g.flipped and g.content == (100, 75)


def _synth_view(tmp_path, chest_left: bool):
    """A small synthetic MONOCHROME2 mammogram with its chest wall on the chosen side."""
    rows, _ = synth.plan_dataset(30, seed=2, positive_rate=0.0, test_patients=0)
    for i, r in enumerate(rows):
        m = synth._machine(r["machine_id"])
        if r["chest_left"] == chest_left and m.photometric == "MONOCHROME2" and r["view"] == "CC":
            _, _, ds = synth.make_image(r, "small", 2, i)
            path = tmp_path / f"{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            return path
    raise AssertionError("no such view in the plan")


@pytest.mark.parametrize("chest_left", [True, False])
@pytest.mark.parametrize("size,mode", [((128, 128), "pad"), ((96, 48), "stretch")])
def test_a_point_planted_in_the_dicom_maps_back_to_where_it_was(tmp_path, chest_left, size, mode):
    """Plant a bright dot in the stored pixels, preprocess, find it on the output, map back."""
    from rsna_utils.dicom.header import read_header
    from rsna_utils.dicom.reader import decode_pixels
    path = _synth_view(tmp_path, chest_left)
    h = read_header(path)
    px, _ = decode_pixels(h)
    cfg = PreprocessConfig(size=size, resize_mode=mode)
    base, meta = preprocess_image(path, cfg, pixels=px, header=h)
    g = ViewGeometry.from_meta(meta, cfg)
    assert g.flipped == (not chest_left)
    y0, x0, y1, x1 = g.box
    ty, tx = y0 + 0.55 * (y1 - y0), x0 + 0.4 * (x1 - x0)      # inside the breast
    yy, xx = np.mgrid[0:px.shape[0], 0:px.shape[1]]
    dot = (yy + 0.5 - ty) ** 2 + (xx + 0.5 - tx) ** 2 <= 6 ** 2
    planted = px.copy()
    planted[dot] = 2 ** h.bits_stored - 1
    out, meta2 = preprocess_image(path, cfg, pixels=planted, header=h)
    assert ViewGeometry.from_meta(meta2, cfg) == g
    diff = np.clip(out.astype(np.float64) - base, 0, None)
    assert diff.max() > 20
    r, c = np.mgrid[0:diff.shape[0], 0:diff.shape[1]]
    cx, cy = ((c + 0.5) * diff).sum() / diff.sum(), ((r + 0.5) * diff).sum() / diff.sum()
    ox, oy = g.canvas_to_original(cx, cy)
    # within one canvas pixel, in original pixels
    tol_x, tol_y = (x1 - x0) / g.content[1], (y1 - y0) / g.content[0]
    assert abs(ox - tx) < tol_x and abs(oy - ty) < tol_y, (ox, oy, tx, ty, tol_x, tol_y)


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("canvas,model_size", [((256, 128), (256, 128)), ((256, 256), (128, 96)),
                                               ((200, 120), (96, 96))])
def test_a_cam_with_a_known_peak_maps_to_the_right_original_pixel(flipped, canvas, model_size):
    """A smooth CAM on a stride-16 feature grid of the model input, peaked over the point where
    a chosen original pixel lands, comes back to that pixel (within the map's resolution)."""
    g = ViewGeometry.from_meta(dict(rows=520, columns=410, crop_y0=30, crop_x0=0, crop_y1=500,
                                    crop_x1=330, flipped=flipped),
                               PreprocessConfig(size=canvas))
    target = (170, 260)                     # original (x, y), away from the crop's edges
    cx, cy = g.original_to_canvas(target[0] + 0.5, target[1] + 0.5)
    sh, sw = input_content(canvas, model_size)
    ux, uy = cx * sw / canvas[1], cy * sh / canvas[0]          # model input coordinates
    fh, fw = model_size[0] // 16, model_size[1] // 16
    jj, ii = np.meshgrid(np.arange(fw) + 0.5, np.arange(fh) + 0.5)
    fx, fy = ux * fw / model_size[1], uy * fh / model_size[0]  # feature-grid coordinates
    cam = np.exp(-((jj - fx) ** 2 + (ii - fy) ** 2) / (2 * 0.8 ** 2)).astype(np.float32)
    heat = cam_to_canvas(cam, model_size, canvas)
    assert heat.shape == canvas and heat.min() >= 0
    x, y = g.canvas_to_original_pixel(*canvas_peak(heat, g))
    # one canvas pixel plus a quarter feature cell, in original pixels
    per_canvas = 330 / g.content[1]
    tol = per_canvas * (1 + 0.25 * 16 * canvas[1] / sw)
    assert abs(x - target[0]) <= tol and abs(y - target[1]) <= tol, (x, y, target, tol)
    # and the heat drawn on the original grid peaks there too
    full = g.canvas_to_original_image(heat)
    assert full.shape == (520, 410)
    fy_, fx_ = np.unravel_index(int(np.argmax(full)), full.shape)
    assert abs(fx_ - target[0]) <= tol and abs(fy_ - target[1]) <= tol
    assert full[:30].max() == 0 and full[:, 330:].max() == 0        # outside the crop: 0


def test_heat_outside_the_crop_is_zero_at_a_figure_scale():
    g = _geometry(True)
    heat = np.ones(g.canvas, np.float32)
    small = g.canvas_to_original_image(heat, scale=0.25)
    assert small.shape == (100, 75)
    assert small[:12].max() == 0 and small[88:].max() == 0 and small[:, 66:].max() == 0
    assert small[20:80, 8:60].min() > 0.99


@pytest.mark.parametrize("name", ["resnet18",      # the larger two: make test, not --fast
                                  pytest.param("resnext50_32x4d", marks=pytest.mark.heavy),
                                  "tf_efficientnet_lite0",
                                  pytest.param("efficientnet_b2", marks=pytest.mark.heavy)])
def test_cams_on_every_plan_backbone(name):
    """GeM pooling and an auxiliary head (logit 0 is the cancer): the CAM has the chosen feature
    map's grid (stride 32 or 16), the logits are the model's own, the weights keep their
    requires_grad and get no gradient."""
    from rsna_utils.learn.checkpoint import cancer_logit
    from rsna_utils.learn.models import create_model, set_outputs
    torch.manual_seed(0)
    m = create_model(name, global_pool="gem")
    set_outputs(m, 3)
    m.eval()
    x = torch.rand(2, 3, 64, 32)
    with torch.no_grad():
        expected = cancer_logit(m(x))
    for method, layer, grid in (("gradcam", -1, (2, 1)), ("hirescam", -2, (4, 2)),
                                ("layercam", -2, (4, 2))):
        cams, logits = grad_cam(m, x, method, layer)
        assert tuple(cams.shape) == (2, *grid) and tuple(logits.shape) == (2,)
        assert torch.isfinite(cams).all() and (cams >= 0).all()
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert all(p.requires_grad and p.grad is None for p in m.parameters())


def test_unknown_cam_choices_are_refused():
    from rsna_utils.core.errors import RsnaError
    from rsna_utils.learn.models import create_model
    m = create_model("resnet18").eval()
    with pytest.raises(RsnaError, match="choose gradcam, hirescam, layercam"):
        grad_cam(m, torch.rand(1, 3, 32, 32), "saliency")
    with pytest.raises(RsnaError, match="no feature stage -9"):
        grad_cam(m, torch.rand(1, 3, 32, 32), layer=-9)


def test_grad_cam_follows_the_evidence():
    """A toy 'backbone' with two channels, one seeing only the right half of the input and one
    only the left; the logit rises with the first and falls with the second: the CAM is on the
    right and zero on the left."""
    class Toy(torch.nn.Module):
        def forward_features(self, x):
            f = torch.nn.functional.avg_pool2d(x[:, :1], 8)
            right = torch.zeros_like(f)
            right[..., f.shape[-1] // 2:] = 1
            return torch.cat([f * right, f * (1 - right)], dim=1)

        def forward_head(self, f):
            return (5 * f[:, 0].mean(dim=(1, 2)) - f[:, 1].mean(dim=(1, 2)))[:, None]

    x = torch.rand(1, 3, 32, 32)
    for method in ("gradcam", "hirescam", "layercam"):
        cams, _ = grad_cam(Toy(), x, method, layer=-1)
        assert cams.shape == (1, 4, 4)
        assert cams[0, :, 2:].min() > 0 and cams[0, :, :2].max() == 0


def test_pointing_game_counts_hits_and_chance(synth_small):
    """Peaks placed on the planted lesions hit; peaks in the image's corner miss; chance is the
    share of the breast the grown boxes cover."""
    import pandas as pd

    from rsna_utils.reports.heatmap import pointing_game
    les = pd.read_csv(synth_small / "lesions.csv")
    train = pd.read_csv(synth_small / "train.csv")
    mal = les[les.kind.isin(["mass", "calc"]) & les.image_id.isin(train.image_id)]
    first = mal.drop_duplicates("image_id").head(6)
    views = first.merge(train[["image_id", "patient_id"]], on="image_id")
    views["peak_x"] = ((views.x0 + views.x1) // 2).astype("Int64")
    views["peak_y"] = ((views.y0 + views.y1) // 2).astype("Int64")
    views.loc[views.index[:2], ["peak_x", "peak_y"]] = 0          # two misses
    views["score"] = np.linspace(0.9, 0.5, len(views))
    pg = pointing_game(views, les, synth_small / "train_images", threshold=0.4, margin=0.0)
    assert (pg["views"], pg["hits"]) == (6, 4) and pg["hit_rate"] == pytest.approx(4 / 6)
    assert 0 < pg["chance"] < 0.2
    assert list(pg["per_view"].hit) == [False, False, True, True, True, True]
    # without a threshold the k = 6 best views are all lesion views; at 0.8 only 2 are detected
    assert pointing_game(views, les, synth_small / "train_images")["views"] == 6
    assert pointing_game(views, les, synth_small / "train_images", threshold=0.8)["views"] == 2


@pytest.mark.slow
def test_heatmaps_point_at_the_planted_lesions(tmp_path):
    """The pointing game on patients the model never saw: a pretrained EfficientNet-Lite0
    trained briefly on synthetic patients with planted lesions; `write_exam_reports` on new
    patients; for the lesion views among the k best-scored views (k = the number of lesion
    views), the heat's peak must fall in the lesion box (plus 2% of the image's longer side)
    for >= 80% of them, far above a uniformly random point in the breast."""
    import time

    import pandas as pd

    from rsna_utils.image.preprocess import Preprocessor
    from rsna_utils.learn.train import TrainConfig, train
    from rsna_utils.reports.exam import write_exam_reports
    from rsna_utils.reports.heatmap import pointing_game
    t0 = time.perf_counter()
    data = tmp_path / "data"
    synth.synthesize(data, patients=80, seed=11, positive_rate=0.5, size="small",
                     test_patients=30, workers=2, progress=False)
    Preprocessor(PreprocessConfig(size=(256, 128)), workers=2, progress=False).run(
        data / "train_images", data / "train.csv", tmp_path / "png")
    train(TrainConfig(data=str(tmp_path / "png"), csv=str(data / "train.csv"),
                      out=str(tmp_path / "run"), model="tf_efficientnet_lite0", size=[256, 128],
                      epochs=2, batch_size=16, pretrained_path="pypi", workers=1, device="cpu",
                      progress=False, seed=42))
    t1 = time.perf_counter()
    r = write_exam_reports(data / "test_images", data / "test.csv", [tmp_path / "run" / "best.pt"],
                           tmp_path / "report", device="cpu", progress=False)
    pg = pointing_game(r["views"], pd.read_csv(data / "lesions.csv"), data / "test_images",
                       margin=0.02)
    t2 = time.perf_counter()
    print(f"pointing game: {pg['hits']}/{pg['views']} detected lesion views hit "
          f"({pg['hit_rate']:.3f}; {pg['lesion_views']} lesion views), chance {pg['chance']:.3f}; "
          f"data + training {t1 - t0:.0f} s, reports + scoring {t2 - t1:.0f} s")
    assert pg["views"] >= 15, pg
    assert pg["hit_rate"] >= 0.8, pg
    assert pg["hit_rate"] >= pg["chance"] + 0.5, pg


def test_the_flip_tta_map_is_the_image_and_its_mirror_averaged():
    """With tta, the map (like the score) averages the image and its mirror: explaining the
    mirrored image gives the mirrored map and the same score. The unflipped image's map alone
    (before) is not mirror-symmetric in this way."""
    from rsna_utils.infer.scoring import LoadedEnsemble, LoadedModel
    from rsna_utils.learn.models import create_model
    from rsna_utils.reports.heatmap import explain_batch
    torch.manual_seed(0)
    net = create_model("resnet18").eval()
    torch.nn.init.normal_(net.get_classifier().weight, std=0.5)     # a head that looks
    m = LoadedModel(net, "resnet18", "x.pt", 0.5, 0.02, size=(128, 128))
    rng = np.random.default_rng(0)
    img = np.zeros((128, 128), np.uint8)
    img[16:112, :80] = rng.integers(60, 220, (96, 80))        # a breast on the left, textured
    img[40:56, 48:64] = 255                                    # a bright spot
    mirror = np.ascontiguousarray(img[:, ::-1])
    ens = LoadedEnsemble([m], {"size": (128, 128)}, torch.device("cpu"), tta=True)
    s, h = explain_batch([img, mirror], ens, method="layercam")
    assert h[0].max() > 0
    assert s[0] == pytest.approx(s[1], rel=1e-4)
    np.testing.assert_allclose(h[1], h[0][:, ::-1], atol=1e-4 * max(h[0].max(), 1e-6))
    s1, h1 = explain_batch([img, mirror], ens, method="layercam", tta=False)
    assert np.abs(h1[1] - h1[0][:, ::-1]).max() > 1e-3 * h1[0].max()
