"""Command line of the shard writer: train/val shards from digits, an image folder or a CSV::

    python scripts/make_shards.py --source digits --out data/digits
    python scripts/make_shards.py --source folder --path my_images --out data/mine
    python scripts/make_shards.py --source csv --path pairs.csv --csv-label-key label --out data/pairs

(``python -m openclip_structure.data.cli`` is the same command.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .sources import csv_samples, folder_class_names, folder_samples
from .writer import write_dataset, write_digits_dataset


def main(argv=None) -> int:
    """Command line: build train/val shards from digits, a folder or a CSV."""
    p = argparse.ArgumentParser(description="Write train/val webdataset shards from digits, an image folder or a CSV.")
    p.add_argument("--source", choices=("digits", "folder", "csv"), required=True)
    p.add_argument("--path", help="image folder (folder) or CSV file (csv)")
    p.add_argument("--out", required=True, help="output folder (gets train/, val/, dataset.json)")
    p.add_argument("--image-size", type=int, default=None,
                   help="digits: side length (default 32); folder/csv: shorter side (default: keep size)")
    p.add_argument("--val-fraction", type=float, default=0.25)
    p.add_argument("--train-shards", type=int, default=8)
    p.add_argument("--val-shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv-img-key", default="filepath")
    p.add_argument("--csv-caption-key", default="title")
    p.add_argument("--csv-label-key", default=None)
    p.add_argument("--csv-separator", default=",")
    a = p.parse_args(argv)

    split = dict(val_fraction=a.val_fraction, train_shards=a.train_shards, val_shards=a.val_shards)
    if a.source == "digits":
        info = write_digits_dataset(a.out, a.image_size or 32, a.seed, **split)
    elif a.path is None:
        p.error(f"--source {a.source} needs --path")
    else:
        if a.source == "folder":
            samples = folder_samples(a.path, a.image_size)
            # subfolder names are the class names unless .cls files give the ids
            names = [] if any(Path(a.path).rglob("*.cls")) else folder_class_names(a.path)
        else:
            samples, names = csv_samples(a.path, a.csv_img_key, a.csv_caption_key, a.csv_label_key,
                                         a.csv_separator, a.image_size), None
        info = write_dataset(samples, a.out, seed=a.seed, classnames=names or None, **split)
    report = [f"{name}: {info[name]['pattern']}  ({info[name]['num_samples']} samples, "
              f"{info[name]['num_shards']} shards)" for name in ("train", "val")]
    report += [f"num_classes: {info['num_classes']}", f"wrote {Path(a.out).resolve() / 'dataset.json'}"]
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
