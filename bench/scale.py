"""COCO-scale benchmark of the stages that need no teacher model and no trainer: rate, memory, bytes, files.

Run from the repository root:  ``.venv/bin/python bench/scale.py --instances 900000 [--coco DIR] [--work DIR]
[--no-dvc]``

Builds a synthetic COCO-format dataset from a template: the built-in sample (``picosam_pipeline/data/sample.py``,
generated into the work folder, clean: no planted bad inputs), so a fresh clone runs it as it is; or with
``--coco DIR`` a COCO-layout folder (``DIR/annotations/instances_<split>.json`` beside ``DIR/<split>/``, e.g.
``../shared/data/coco-sample``). The template's annotations are repeated under new image and annotation ids until
``--instances`` is reached, 5 % of them in ``val`` as in COCO (the image files hard-linked, not copied); then it
runs, each in its own process (with its workers) so its peak RSS is its own:

* ``prepare``   the real stage (``run-stage prepare``: annotations checked, every image decoded once);
* ``teacher``   the teacher store written by the GT-mask stand-in (``teacher/gt_mask.py``: every mask decoded,
                resampled into its crop frame, encoded, written shard by shard, with digests);
* ``pack``      the real stage (``run-stage pack``): WebDataset shards of the train and val splits;
* ``loader``    one pass of the training loader over the train shards (batch 64, decode + shuffle buffer);
* ``evaluate``  the evaluate stage's GT handling on the val split: ``InstanceGT.from_index``, the loader, every
                sample's full-image GT mask decoded and scored against the stored teacher logits.

Then, unless ``--no-dvc``, the DVC times for the store and the shards: ``dvc add`` (hashing into the cache, hard
links), ``dvc push`` to a local remote, and ``dvc pull`` into an emptied cache and workspace.

``--instances N`` runs two sizes, N / 10 and N, so growth is visible (``--sizes A B ...`` picks them). Per stage
it prints instances/s, peak RSS, output bytes and file count. Targets at 860k instances on the 2-core CPU
machine (issue 12): peak RSS <= 8 GB in every stage, each stage >= 2,000 instances/s, teacher store <= 1,000
files, shards <= 300 files. Nothing is asserted: the figures are printed, and written as JSON to
``bench/out/scale.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = {"train": 24, "val": 8}  # the built-in sample as the template: ~150 annotations, seconds to generate
VAL_SHARE = 0.05  # COCO 2017: 36.8k of 896k instances are val
TARGETS = {"rss_gb": 8.0, "instances_per_s": 2000, "store_files": 1000, "shard_files": 300}

# --------------------------------------------------------------------------------------------------
# the synthetic dataset


def template_splits(source: Path) -> list[str]:
    """The splits of a COCO-layout folder: each ``annotations/instances_<split>.json`` with a ``<split>/`` folder."""
    splits = sorted(
        path.stem.removeprefix("instances_")
        for path in (source / "annotations").glob("instances_*.json")
        if (source / path.stem.removeprefix("instances_")).is_dir()
    )
    if not splits:
        sys.exit(f"{source}: no COCO-layout split (annotations/instances_<split>.json beside a <split>/ image folder)")
    return splits


def builtin_sample(out: Path) -> Path:
    """The built-in sample (no planted bad inputs) generated into ``out``: the default template."""
    from picosam_pipeline.config import SampleConfig
    from picosam_pipeline.data.sample import generate

    with contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        generate(
            SampleConfig(
                out_dir=str(out),
                train_images=SAMPLE_IMAGES["train"],
                val_images=SAMPLE_IMAGES["val"],
                plant_bad_inputs=False,
            )
        )
    return out


def build_dataset(root: Path, instances: int, source: Path) -> dict[str, int]:
    """Write ``root/annotations/instances_{train,val}.json`` and ``root/{train,val}/`` (hard links) with ``instances``
    annotations in all, repeating the annotated images of the COCO-layout folder ``source`` (every split of it);
    returns images and instances per split. Streams the JSON: memory stays at one image."""
    templates = []
    for split in template_splits(source):
        data = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        by_image: dict[int, list] = {}
        for ann in data["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann)
        templates += [
            (source / split / img["file_name"], img, by_image[img["id"]], data["categories"])
            for img in data["images"]
            if by_image.get(img["id"])
        ]
    categories = templates[0][3]
    quotas = {"val": round(instances * VAL_SHARE)}
    quotas["train"] = instances - quotas["val"]
    counts, image_id, ann_id = {}, 0, 0
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, quota in quotas.items():
        images = root / split
        images.mkdir(parents=True)
        done, n_images = 0, 0
        target = root / "annotations" / f"instances_{split}.json"
        # The images array is written straight to the file and the annotations to a second one, appended at the end:
        # nothing accumulates (the bench process stays small, and with it what its stage processes inherit).
        with open(target, "w") as out, tempfile.TemporaryFile("w+", dir=root / "annotations") as ann_out:
            out.write(
                '{"info": '
                + json.dumps({"description": f"bench/scale.py: {source.name} repeated"})
                + ', "licenses": [], "categories": '
            )
            out.write(json.dumps(categories) + ', "images": [')
            while done < quota:
                path, img, anns, _ = templates[image_id % len(templates)]
                image_id += 1
                name = f"{image_id:012d}{path.suffix}"
                os.link(path, images / name) if _same_device(path, images) else os.symlink(path, images / name)
                out.write((", " if n_images else "") + json.dumps({**img, "id": image_id, "file_name": name}))
                for ann in anns[: quota - done]:
                    ann_id += 1
                    ann_out.write((", " if done else "") + json.dumps({**ann, "id": ann_id, "image_id": image_id}))
                    done += 1
                n_images += 1
            out.write('], "annotations": [')
            ann_out.seek(0)
            shutil.copyfileobj(ann_out, out)
            out.write("]}")
        counts[split] = {"images": n_images, "instances": done}
    return counts


def _same_device(a: Path, b: Path) -> bool:
    return a.stat().st_dev == b.stat().st_dev


# --------------------------------------------------------------------------------------------------
# the stages, each in a process of its own

TEACHER = """
import json, sys
from picosam_pipeline.teacher.gt_mask import write_mask_teacher_store
store = write_mask_teacher_store(sys.argv[1], sys.argv[2], splits=["train", "val"], instances_per_shard="auto")
print(json.dumps({"instances": len(store), "shards": store.n_shards}))
"""

LOADER = """
import json, sys, torch
torch.set_num_threads(1)
from picosam_pipeline.train.loader import make_loader
n = 0
for batch in make_loader(sys.argv[1], batch_size=64, shuffle_buffer=1000, num_workers=int(sys.argv[2]), seed=0):
    n += len(batch["image"])
print(json.dumps({"instances": n}))
"""

EVALUATE = """
import json, sys
from picosam_pipeline.evaluate.score_table import InstanceGT, evaluate_batches
from picosam_pipeline.evaluate.shard_evaluation import evaluate_loader_workers
from picosam_pipeline.train.loader import make_loader
gt = InstanceGT.from_index(sys.argv[1], "val")
batches = make_loader(sys.argv[2], batch_size=64, shuffle_buffer=0, num_workers=evaluate_loader_workers(), seed=0)
table, _ = evaluate_batches(batches, {}, gt, teachers=batches.teachers)
print(json.dumps({"instances": len(table), "teacher_full_image_miou": float(table["teacher_full_iou"].mean())}))
"""


def measure(command: list[str], cwd: Path, log: Path) -> dict:
    """Run ``command``; its wall time, peak RSS and the JSON it printed last.

    Peak memory is the larger of the stage's whole process tree (the stage and its worker processes, each process's
    proportional set size summed: a page the processes share, such as torch's libraries or a forked worker's
    copy-on-write view of its parent, counts once in all; sampled every 2 s, as reading it costs ~10 ms a process)
    and the stage process's own peak resident size (``VmHWM``, read every 0.2 s; it also catches a peak between two
    samples). Not wait4's ``ru_maxrss``: Linux carries the
    parent's resident size across fork + exec into it, so every stage would report at least this process's size."""
    import psutil

    start = time.perf_counter()
    tree_peak = own_peak = 0
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out_file:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=out_file,
            stderr=err,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"},
        )
        root = psutil.Process(proc.pid)
        for tick in itertools.count():
            if proc.poll() is not None:
                break
            try:
                own_peak = max(own_peak, _high_water_mark(proc.pid))
                if tick % 10 == 0:
                    processes = [root, *root.children(recursive=True)]
                    tree_peak = max(tree_peak, sum(p.memory_full_info().pss for p in processes))
            except (psutil.Error, OSError):  # a worker, or the stage, exited between listing and reading it
                pass
            time.sleep(0.2)
        out_file.seek(0)
        out = out_file.read()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} failed (exit {proc.returncode}); its log: {log}\n{log.read_text()[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return {
        "seconds": seconds,
        "peak_rss_gb": max(own_peak, tree_peak) / 2**30,
        **(json.loads(lines[-1]) if lines else {}),
    }


def _high_water_mark(pid: int) -> int:
    """``VmHWM`` of a running process, bytes: the peak resident size of its own address space since its exec."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def tree(path: Path) -> tuple[int, int]:
    """Bytes and file count under ``path``."""
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files), len(files)


def run_size(work: Path, instances: int, dvc: bool, loader_workers: int, source: Path) -> dict:
    """Build the dataset of ``instances`` under ``work`` from ``source`` and measure every stage; returns the
    figures."""
    t0 = time.perf_counter()
    counts = build_dataset(work / "dataset", instances, source)
    built = time.perf_counter() - t0
    params = {
        "runtime": {"device": "cpu", "metrics_dir": str(work / "metrics")},
        "dataset": {"name": "dataset", "dir": str(work)},
        "prepare": {"splits": "auto", "out_dir": str(work / "prepared")},
        "pack": {
            "index": str(work / "prepared/index.parquet"),
            "stores_dir": str(work / "stores"),
            "teachers": ["gt"],
            "out_dir": str(work / "shards"),
        },
    }
    (work / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    python, cli = sys.executable, [sys.executable, "-m", "picosam_pipeline"]
    index, store, shards = work / "prepared/index.parquet", work / "stores/gt.zarr", work / "shards"
    stages = {
        "prepare": (cli + ["run-stage", "prepare", "--params", "params.yaml"], work / "prepared"),
        "teacher": ([python, "-c", TEACHER, str(index), str(store)], store),
        "pack": (cli + ["run-stage", "pack", "--params", "params.yaml"], shards),
        "loader": ([python, "-c", LOADER, str(shards / "train"), str(loader_workers)], None),
        "evaluate": ([python, "-c", EVALUATE, str(index), str(shards / "val")], None),
    }
    figures = {
        "instances": instances,
        "images": sum(c["images"] for c in counts.values()),
        "splits": counts,
        "dataset_seconds": round(built, 1),
        "stages": {},
    }
    for name, (command, output) in stages.items():
        result = measure(command, work, work / f"{name}.log")
        n = result.get("instances") or instances
        result.update(instances=n, instances_per_s=n / result["seconds"])
        if output is not None:
            result["output_bytes"], result["output_files"] = tree(output)
        figures["stages"][name] = result
        print(f"  {instances:>9,} {name:<9} {_row(result)}", flush=True)
    if dvc:
        figures["dvc"] = dvc_times(work, [store, shards])
        print(
            f"  {instances:>9,} dvc       "
            + ", ".join(f"{k} {v:.1f} s" for k, v in figures["dvc"].items() if k.endswith("_s")),
            flush=True,
        )
    return figures


def dvc_times(work: Path, outputs: list[Path]) -> dict:
    """``dvc add`` / ``push`` / ``pull`` of ``outputs`` in a fresh repository at ``work`` (local remote, hard links)."""
    dvc = [sys.executable, "-m", "dvc"]

    def timed(*args: str) -> float:
        start = time.perf_counter()
        subprocess.run(
            [*dvc, *args],
            cwd=work,
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "DVC_NO_ANALYTICS": "1"},
        )
        return time.perf_counter() - start

    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=work, check=True)
    subprocess.run([*dvc, "config", "cache.type", "hardlink"], cwd=work, check=True)  # no second copy of the data
    subprocess.run([*dvc, "remote", "add", "-d", "local", str(work / "remote")], cwd=work, check=True)
    names = [str(p.relative_to(work)) for p in outputs]
    times = {"add_s": timed("add", "-q", *names), "push_s": timed("push", "-q")}
    objects = sum(1 for f in (work / "remote").rglob("*") if f.is_file())
    for path in outputs:
        shutil.rmtree(path)
    shutil.rmtree(work / ".dvc" / "cache")
    times["pull_s"] = timed("pull", "-q")
    times["remote_objects"] = objects
    return times


def _row(r: dict) -> str:
    text = f"{r['instances_per_s']:>9,.0f} inst/s  {r['seconds']:>7.1f} s  peak RSS {r['peak_rss_gb']:5.2f} GB"
    if "output_files" in r:
        text += f"  {r['output_bytes'] / 2**20:>8,.1f} MiB in {r['output_files']:>6,} files"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=100_000, help="the larger size; N / 10 runs too")
    parser.add_argument("--sizes", type=int, nargs="+", help="run exactly these sizes instead")
    parser.add_argument(
        "--coco",
        type=Path,
        metavar="DIR",
        help="a COCO-layout folder to repeat (annotations/instances_<split>.json, <split>/ images), "
        "e.g. ../shared/data/coco-sample (default: the built-in sample, generated)",
    )
    parser.add_argument("--work", type=Path, help="folder for the datasets and outputs (default: a temporary one)")
    parser.add_argument("--no-dvc", dest="dvc", action="store_false", help="skip the DVC add/push/pull timings")
    parser.add_argument("--loader-workers", type=int, default=2, help="DataLoader workers of the loader pass")
    parser.add_argument("--keep", action="store_true", help="keep the outputs (default: each size's are deleted)")
    args = parser.parse_args()
    if args.coco is not None:
        args.coco = args.coco.resolve()
        if not args.coco.is_dir():
            sys.exit(f"--coco {args.coco}: not a folder")
        template_splits(args.coco)  # fails early, naming the layout it expects
    sizes = args.sizes or sorted({max(1000, args.instances // 10), args.instances})
    base = Path(tempfile.mkdtemp(prefix="scale-", dir=args.work))
    print(
        f"bench/scale.py: sizes {sizes}; {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; work folder {base}",
        flush=True,
    )
    results = []
    try:
        source = args.coco or builtin_sample(base / "template")
        print(f"template: {source} (splits {', '.join(template_splits(source))})", flush=True)
        for n in sizes:
            work = base / f"n{n}"
            work.mkdir()
            results.append(run_size(work, n, args.dvc, args.loader_workers, source))
            if not args.keep:
                shutil.rmtree(work)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print_table(results)
    out = REPO / "bench" / "out" / "scale.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"targets": TARGETS, "results": results}, indent=1) + "\n")
    print(f"figures written to {out.relative_to(REPO)}")


def print_table(results: list[dict]) -> None:
    """One line per stage and size, then the targets at the largest size."""
    print(f"\n{'stage':<10}" + "".join(f"{r['instances']:>34,}" for r in results))
    for stage in results[0]["stages"]:
        cells = []
        for r in results:
            s = r["stages"][stage]
            cells.append(
                f"{s['instances_per_s']:>8,.0f}/s {s['peak_rss_gb']:5.2f} GB "
                + (f"{s['output_files']:>6,} files" if "output_files" in s else " " * 12)
            )
        print(f"{stage:<10}" + "".join(f"{c:>34}" for c in cells))
    if len(results) > 1:  # process start and imports cancel out: the cost of the extra instances alone
        a, b = results[-2]["stages"], results[-1]["stages"]

        def marginal(stage: str) -> str:
            extra, seconds = b[stage]["instances"] - a[stage]["instances"], b[stage]["seconds"] - a[stage]["seconds"]
            return (
                f"{stage} {extra / seconds:,.0f}/s"
                if seconds > 0
                else f"{stage} n/a (the larger size ran faster: noise)"
            )

        print(
            "marginal rate between the two largest sizes (process start and imports cancelled out): "
            + ", ".join(marginal(stage) for stage in b)
        )
    if "dvc" in results[0]:
        for key in ("add_s", "push_s", "pull_s", "remote_objects"):
            print(f"dvc {key:<6}" + "".join(f"{r['dvc'][key]:>34,.1f}" for r in results))
    last = results[-1]["stages"]
    checks = {
        "peak RSS <= 8 GB in every stage": max(s["peak_rss_gb"] for s in last.values()) <= TARGETS["rss_gb"],
        ">= 2,000 instances/s in every stage": min(s["instances_per_s"] for s in last.values())
        >= TARGETS["instances_per_s"],
        "teacher store <= 1,000 files": last["teacher"]["output_files"] <= TARGETS["store_files"],
        "shards <= 300 files": last["pack"]["output_files"] <= TARGETS["shard_files"],
    }
    print(
        f"\ntargets at {results[-1]['instances']:,} instances: "
        + "; ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in checks.items())
    )


if __name__ == "__main__":
    main()
