"""Scale benchmark: Snakemake DAG time, no-op rerun time, discovery with a warm and a cold
header cache, and the jobs an update schedules, for a cohort of N series.

Run by hand (not a test):

    python tests/benchmarks/bench_scale.py --series 10000 [--workdir /tmp/bench10k] [--repeats 3]

The cohort is cheap but real DICOM. It has one series per visit by default
(``--series-per-visit``). That is the hardest case for the DAG: N visits make N /
shard_size shards, and each shard runs 5 jobs. Each series has ``--slices`` CT files
of 8 x 8 pixels with complete geometry, acquisition and UID headers. pydicom writes
one template file, and the others are that file with their UIDs, instance number and
slice position replaced in place (same lengths). A sample is read back with pydicom
and cacflow's header reader, and must match. With so few slices, every series fails
QC (`too_few_slices`), so every visit is `not_scorable`. convert, infer and score
still run one job per shard, but have no per-visit work. The declared outputs, the
jobs and the DAG are those of a scored cohort of the same size.

What is measured (wall time, median of ``--repeats`` where a step can be repeated):
  1. generation of the archive and manifest;
  2. ``snakemake -n`` before any run: the plan checkpoint has not run yet, so this
     DAG holds plan_shards, aggregate, report and data_dictionary only;
  3. ``snakemake -n`` after the plan checkpoint ran: the full DAG, every per-shard job;
  4. the full run (``snakemake --cores 2``) for real: plan, discover (cold: no header
     cache yet), select, convert, infer, score, aggregate, report;
  5. the no-op rerun: ``snakemake --cores 2`` on the finished workflow (must print
     "Nothing to be done"), and ``snakemake -n`` on it;
  6. discovery of every shard in this process (``pipeline.stage_discover``, output to
     a scratch folder): cold, with no header cache, then warm (the cache the cold pass
     wrote). Both passes have the files in the OS page cache, so only the header
     parsing differs. The warm pass also counts the headers it read (expected: 0);
  7. 1 % new series (new visits) added to the manifest: ``snakemake -n`` before the
     plan checkpoint reran, then after it reran, with the jobs per rule. The update is
     then run for real, and the jobs Snakemake actually ran are counted from its log.

``--skip-full-run`` stops after step 3 and measures discovery only (no no-op figure).
``--hide-scontrol`` puts a stub ``scontrol`` (exit 1) first on PATH for the Snakemake
commands. Snakemake's SLURM executor plugin, when installed, runs
``scontrol show config`` every time Snakemake starts. On a machine with SLURM
clients but no reachable controller, that waits about 9 s. The start-up time is
printed either way, so the two can be told apart.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cacflow.manifest import write_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root
UID_LENGTH = 62
PER_BUCKET = 1000  # visits per archive sub-folder


# --- cohort ----------------------------------------------------------------------

def _uid(kind: int, *numbers: int) -> str:
    """A valid fixed-length UID, unique per (kind, numbers)."""
    body = f"{kind}" + "".join(f"{n:09d}" for n in numbers)
    uid = UID_ROOT + "1" + body.rjust(UID_LENGTH - len(UID_ROOT) - 1, "0")
    assert len(uid) == UID_LENGTH
    return uid


def _template() -> tuple[bytes, dict[str, list[int]]]:
    """One CT file written by pydicom, and the offsets of its per-file values."""
    import io

    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    placeholders = {"study": "7" * UID_LENGTH, "series": "8" * UID_LENGTH, "sop": "9" * UID_LENGTH,
                    "instance": "424242", "z": "434343.434"}  # same lengths as the values written
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = placeholders["sop"]
    ds.StudyInstanceUID = placeholders["study"]
    ds.SeriesInstanceUID = placeholders["series"]
    ds.Modality = "CT"
    ds.Manufacturer = "SIEMENS"
    ds.ManufacturerModelName = "SOMATOM Force"
    ds.SeriesDescription = "CaSc 3.0 Qr36 70%"
    ds.ProtocolName = "Calcium Score"
    ds.ConvolutionKernel = ["Qr36d", "3"]
    ds.KVP = 120
    ds.SliceThickness = 3.0
    ds.CardiacSynchronizationTechnique = "PROSPECTIVE"
    ds.NominalPercentageOfCardiacPhase = 70
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = placeholders["instance"]
    ds.ImagePositionPatient = ["-2.8", "-2.8", placeholders["z"]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = placeholders["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    offsets = {}
    for name, placeholder in placeholders.items():
        offsets[name] = [m.start() for m in re.finditer(re.escape(placeholder.encode()), data)]
        # Each UID once (the SOP instance UID also in the file meta), each value once.
        assert len(offsets[name]) == (2 if name == "sop" else 1), (name, offsets[name])
    return data, offsets


def write_cohort(root: Path, n_series: int, series_per_visit: int, n_slices: int, first_visit: int = 0,
                 n_visits: int | None = None) -> list[dict]:
    """Write visits ``first_visit`` .. onward; return their manifest rows."""
    data, offsets = _template()
    template = bytearray(data)
    n_visits = n_visits if n_visits is not None else math.ceil(n_series / series_per_visit)
    rows = []
    for visit in range(first_visit, first_visit + n_visits):
        participant = f"B{visit + 1:07d}"
        folder = root / "archive" / f"{visit // PER_BUCKET:04d}" / participant / "baseline"
        study = _uid(1, visit)
        for series in range(series_per_visit):
            series_uid = _uid(2, visit, series)
            series_dir = folder / f"s{series + 1}"
            series_dir.mkdir(parents=True, exist_ok=True)
            for index in range(n_slices):
                values = {"study": study, "series": series_uid, "sop": _uid(3, visit, series, index),
                          "instance": f"{index + 1:06d}", "z": f"{3.0 * index:010.3f}"}
                for name, places in offsets.items():
                    encoded = values[name].encode()
                    for offset in places:
                        template[offset:offset + len(encoded)] = encoded
                with open(series_dir / f"IM{index + 1:04d}", "wb") as handle:
                    handle.write(template)
        rows.append({"participant_id": participant, "visit": "baseline", "dicom_dir": str(folder)})
    return rows


def check_sample(rows: list[dict], n_slices: int) -> None:
    """Generated files must read back as the headers they were meant to have."""
    import pydicom

    from cacflow.discover import discover_visit

    for row in (rows[0], rows[len(rows) // 2], rows[-1]):
        found = discover_visit(row["dicom_dir"])
        assert found.unreadable == [] and found.series, found
        for series in found.series:
            assert (series.n_files, series.orientation, series.kvp, series.rows) == (n_slices, "axial", 120.0, 8)
            assert series.slice_increment_mm in (None, 3.0) and series.n_gaps == 0
            first = pydicom.dcmread(series.files[0])
            assert first.SeriesInstanceUID == series.series_uid and first.pixel_array.shape == (8, 8)


# --- Snakemake -------------------------------------------------------------------

class Snakemake:
    def __init__(self, workdir: Path, shard_size: int, hide_scontrol: bool):
        self.workdir, self.shard_size = workdir, shard_size
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        if hide_scontrol:
            stub = workdir / "stub-bin"
            stub.mkdir(exist_ok=True)
            (stub / "scontrol").write_text("#!/bin/sh\nexit 1\n")
            (stub / "scontrol").chmod(0o755)
            path = f"{stub}{os.pathsep}{path}"
        self.env = {**os.environ, "PATH": path}

    def __call__(self, manifest: Path, *args: str, log: str | None = None) -> tuple[float, str]:
        command = [sys.executable, "-m", "snakemake", "-s", str(REPO_ROOT / "Snakefile"), "--directory",
                   str(self.workdir), "--cores", "2", *args, "--config", f"manifest={manifest}",
                   f"shard_size={self.shard_size}"]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, cwd=self.workdir)
        seconds = time.perf_counter() - started
        output = result.stdout + result.stderr
        if log:
            (self.workdir / log).write_text(output)
        if result.returncode != 0:
            raise SystemExit(f"snakemake {' '.join(args)} failed ({result.returncode}):\n{output[-5000:]}")
        return seconds, output

    def startup(self) -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "snakemake", "--version"], capture_output=True, env=self.env, check=True)
        return time.perf_counter() - started


def job_counts(output: str) -> dict[str, int]:
    """Jobs per rule from Snakemake's 'Job stats' table (dry run or real run), and 'total'."""
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    counts = {}
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def jobs_run(output: str) -> dict[str, int]:
    """Jobs Snakemake actually finished, per rule, from its log."""
    counts: dict[str, int] = {}
    for rule in re.findall(r"Finished jobid: \d+ \(Rule: (\w+)\)", output):
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def median_time(repeats: int, function) -> tuple[float, list[float], str]:
    times, output = [], ""
    for _ in range(repeats):
        seconds, output = function()
        times.append(seconds)
    return statistics.median(times), times, output


# --- discovery -------------------------------------------------------------------

def time_discovery(shards_dir: Path, scratch: Path, max_shards: int | None) -> dict:
    """Cold (no header cache) then warm discovery of every shard, in this process."""
    import cacflow.discover
    from cacflow.dicom_headers import read_header
    from cacflow.pipeline import stage_discover

    shards = sorted(p.parent for p in shards_dir.glob("s*/members.tsv"))
    if max_shards:
        shards = shards[:max_shards]
    reads = [0]

    def counting(path):
        reads[0] += 1
        return read_header(path)

    cacflow.discover.read_header = counting
    figures = {"shards": len(shards)}
    try:
        for label in ("cold", "warm", "warm again"):
            reads[0] = 0
            started = time.perf_counter()
            for shard in shards:
                out = scratch / shard.name
                if label == "cold":
                    shutil.rmtree(out, ignore_errors=True)
                stage_discover(shard / "members.tsv", out / "series.parquet", out / "visits.parquet")
            figures[label] = (time.perf_counter() - started, reads[0])
    finally:
        cacflow.discover.read_header = read_header
    return figures


# --- main ------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--series", type=int, required=True, help="N: series in the cohort")
    parser.add_argument("--series-per-visit", type=int, default=1)
    parser.add_argument("--slices", type=int, default=4, help="files per series")
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new folder under /tmp")
    parser.add_argument("--skip-full-run", action="store_true")
    parser.add_argument("--discovery-shards", type=int, default=None, help="time discovery on the first K shards")
    parser.add_argument("--hide-scontrol", action="store_true")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix=f"cacflow-scale-{args.series}-", dir="/tmp"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    n_visits = math.ceil(args.series / args.series_per_visit)
    print(f"cacflow scale benchmark: N = {args.series} series, {args.series_per_visit} per visit -> {n_visits} visits, "
          f"{args.slices} files of 8 x 8 pixels per series, shard_size {args.shard_size}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"workdir {workdir}")
    as_installed = Snakemake(workdir, args.shard_size, hide_scontrol=False).startup()
    hidden = Snakemake(workdir, args.shard_size, hide_scontrol=True).startup()
    print(f"snakemake start-up (`snakemake --version`): {as_installed:.1f} s as installed, {hidden:.1f} s with "
          f"scontrol hidden; the Snakemake figures below are {'with scontrol hidden' if args.hide_scontrol else 'as installed'}")
    snakemake = Snakemake(workdir, args.shard_size, args.hide_scontrol)

    started = time.perf_counter()
    rows = write_cohort(workdir, args.series, args.series_per_visit, args.slices)
    check_sample(rows, args.slices)
    manifest = write_manifest(workdir / "manifest.tsv", rows)
    n_files = n_visits * args.series_per_visit * args.slices
    print(f"generation: {time.perf_counter() - started:.1f} s for {n_files} files")

    dry = lambda: snakemake(manifest, "-n")  # noqa: E731
    seconds, times, output = median_time(args.repeats, dry)
    print(f"snakemake -n, before the plan checkpoint ran: {seconds:.1f} s (runs {_fmt(times)}); "
          f"jobs {job_counts(output)}")
    seconds, _ = snakemake(manifest, str(Path("results/shards/plan.tsv")), log="plan.log")
    print(f"plan checkpoint (real run): {seconds:.1f} s")
    seconds, times, output = median_time(args.repeats, dry)
    counts = job_counts(output)
    print(f"snakemake -n, full DAG after the plan: {seconds:.1f} s (runs {_fmt(times)}); jobs {counts}")

    if not args.skip_full_run:
        seconds, output = snakemake(manifest, log="full_run.log")
        print(f"full run (plan done; cold discovery, select, convert, infer, score, aggregate, report): "
              f"{seconds:.0f} s, {sum(jobs_run(output).values())} jobs")
        noop = lambda: snakemake(manifest)  # noqa: E731
        seconds, times, output = median_time(args.repeats, noop)
        assert "Nothing to be done" in output, output[-3000:]
        print(f"no-op rerun (snakemake --cores 2, nothing to do): {seconds:.1f} s (runs {_fmt(times)})")
        seconds, times, output = median_time(args.repeats, dry)
        assert "Nothing to be done" in output, output[-3000:]
        print(f"snakemake -n on the finished workflow: {seconds:.1f} s (runs {_fmt(times)}); nothing to be done")

    figures = time_discovery(workdir / "results/shards", workdir / "discovery-scratch", args.discovery_shards)
    shard_series = min(n_visits, figures["shards"] * args.shard_size) * args.series_per_visit
    for label in ("cold", "warm", "warm again"):
        seconds, reads = figures[label]
        print(f"discovery {label:10s} ({figures['shards']} shards, {shard_series} series, one process): "
              f"{seconds:.1f} s, {1e3 * seconds / shard_series:.2f} ms per series, {reads} headers read")

    if not args.skip_full_run:
        extra = max(1, math.ceil(n_visits / 100))
        new_rows = write_cohort(workdir, 0, args.series_per_visit, args.slices, first_visit=n_visits, n_visits=extra)
        # Old enough for the header cache (it skips files modified in the last 2 s).
        time.sleep(2.1)
        grown = write_manifest(workdir / "manifest_plus.tsv", rows + new_rows)
        seconds, output = snakemake(grown, "-n")
        print(f"+1 % ({extra} visits, {extra * args.series_per_visit} series): snakemake -n before the plan "
              f"reran: {seconds:.1f} s, jobs {job_counts(output)}")
        snakemake(grown, str(Path("results/shards/plan.tsv")))
        seconds, output = snakemake(grown, "-n")
        print(f"+1 %: snakemake -n after the plan reran: {seconds:.1f} s, jobs {job_counts(output)}")
        seconds, output = snakemake(grown, log="update_run.log")
        print(f"+1 %: the update, run for real: {seconds:.0f} s; jobs run {jobs_run(output)}")


def _fmt(times: list[float]) -> str:
    return ", ".join(f"{t:.1f}" for t in times)


if __name__ == "__main__":
    main()
