"""``stimage cells train-cellpose --monuseg DIR --out MODEL.pt [--epochs N]``: a cellpose 3
nucleus model trained from scratch (no pretrained download) on the MoNuSeg train tiles, for
``--nuclei cellpose --cellpose-model MODEL.pt`` (``export.runtime.nuclei_cellpose``).

Registered under ``stimage cells`` by :func:`add_parser` (called from ``cli/cells.py``).
"""

from __future__ import annotations

from data_pipelines.errors import StimageError
from stimage_jax.cli.common import add_overwrite, positive_float, positive_int, quiet


def add_parser(sub, parents) -> None:
    t = sub.add_parser("train-cellpose", parents=list(parents),
                       help="train a cellpose 3 nucleus model from scratch on MoNuSeg (for --nuclei cellpose)")
    t.add_argument("--monuseg", required=True, help="MoNuSeg folder holding train/ (<name>.png + <name>.xml)")
    t.add_argument("--out", required=True, help="model file (a cellpose 3 state dict, .pt)")
    t.add_argument("--epochs", type=positive_int, default=100, help="epochs (one random crop per tile each)")
    t.add_argument("--images-per-epoch", type=positive_int, help="crops per epoch (default one per tile)")
    t.add_argument("--crop-px", type=positive_int, default=224,
                   help="training crop side, a multiple of 16 (cellpose's 224; 112 is 4x cheaper per step)")
    t.add_argument("--lr", type=positive_float, default=0.005, help="AdamW learning rate (cellpose's default)")
    t.add_argument("--widths", default="32,64,128,256",
                   help="CPnet widths (cellpose's default; smaller is faster, the last stays 256)")
    t.add_argument("--seed", type=int, default=0)
    add_overwrite(t)
    t.set_defaults(func=run)


def run(a) -> int:
    import numpy as np

    from data_pipelines.io import check_writable
    from data_pipelines.monuseg import list_monuseg, load_monuseg_pair, monuseg_mpp
    from export.runtime.nuclei import DEFAULT_MPP
    from export.runtime.nuclei_cellpose import _cellpose, check_widths, train_cellpose

    try:
        widths = check_widths(a.widths.split(","))
    except ValueError:
        raise StimageError(f"--widths {a.widths!r} must be 4 comma-separated integers, e.g. 32,64,128,256") from None
    if a.crop_px % 16:
        raise StimageError(f"--crop-px {a.crop_px} must be a multiple of 16 (the network halves it 4 times)")
    check_writable(a.out, a.overwrite)
    _cellpose()  # a missing package is one line before the tiles are read
    pairs = list_monuseg(a.monuseg, "train")
    images, labels, mpps = [], [], []
    for image, xml in pairs:
        rgb, lab = load_monuseg_pair(image, xml)
        images.append(rgb)
        labels.append(lab)
        mpps.append(monuseg_mpp(xml) or DEFAULT_MPP)
    r = train_cellpose(images, labels, a.out, mpp=float(np.mean(mpps)), epochs=a.epochs,
                       images_per_epoch=a.images_per_epoch, widths=widths, learning_rate=a.lr, seed=a.seed,
                       bsize=a.crop_px,
                       overwrite=a.overwrite, progress=not quiet(a))
    if not quiet(a):
        print(f"cellpose model ({len(images)} tiles, {a.epochs} epochs, final loss {r['train_losses'][-1]:.3f}, "
              f"nuclei {r['diam_labels'] * r['mpp']:.1f} µm across) -> {r['path']}")
    return 0
