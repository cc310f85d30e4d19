"""The training command end to end, in real subprocesses: pinned losses, 1 vs 8 devices, kill and resume,
SIGTERM, bad flags, the HF export (loaded by transformers) and the demo preset."""

import glob
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from safetensors import safe_open

from commands import (ASSETS, ROOT, SAMPLE, STEPS, STORIES, committed, env_for, logged_step, namespace_problem, q, run,
                      run_args, run_in_namespace, start, write_data)

CRASH_WRITING_4 = "os.rename:step_00000004/process_00000.safetensors:1:SIGKILL"  # faults/sitecustomize.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    write_data(d)
    return d


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh]


def final_tensors(out):
    from safetensors.numpy import load_file
    return load_file(os.path.join(out, "hf", "final", "model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(workdir):
    """The uninterrupted run on 8 devices that the other tests compare with."""
    out = workdir / "ref"
    rc, log = run(run_args(workdir, out, "--hf_save_steps", "3"), env_for(8, workdir))
    assert rc == 0, log
    return out, log


# Recorded once from reference_run (float32, 8 CPU devices); asserted to 1e-4.
PINNED = [4.383479, 4.443020, 3.495080]


def test_short_run_pinned_losses_and_loss_goes_down(reference_run):
    out, log = reference_run
    got = losses(out)
    assert len(got) == STEPS
    np.testing.assert_allclose(got[:3], PINNED, atol=1e-4)
    assert np.mean(got[-2:]) < np.mean(got[:2]) - 0.2
    assert f"step {STEPS}/{STEPS}" in log and "tokens/s" in log
    rec = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(rec)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000004", "step_00000006"]
    assert sorted(os.listdir(os.path.join(out, "hf"))) == ["final", "step_00000003"]  # --hf_save_steps 3


def test_failed_upload_keeps_the_export_and_says_so(workdir, reference_run, tmp_path):
    # Offline, the Hub client refuses at once: the failure path runs without touching the network. On a copy
    # of the finished run (it resumes at its last step and exports again): later tests read the reference's.
    out = tmp_path / "upload"
    shutil.copytree(reference_run[0] / "checkpoints", out / "checkpoints")
    rc, log = run(run_args(workdir, out, "--hf_upload", "someone/alpaca-test"), env_for(8, workdir))
    assert rc == 3, log
    assert "upload to someone/alpaca-test failed" in log and f"kept at {out / 'hf' / 'final'}" in log
    assert os.path.exists(out / "hf" / "final" / "model.safetensors")


def test_one_device_gives_the_same_losses(workdir, reference_run):
    out = workdir / "one"
    rc, log = run(run_args(workdir, out), env_for(1, workdir))
    assert rc == 0, log
    np.testing.assert_allclose(losses(out), losses(reference_run[0]), rtol=2e-5)


def test_no_remat_gives_the_same_losses(workdir, reference_run):
    # Recomputing a layer in the backward pass is an implementation choice, not a change of the maths.
    out = workdir / "no_remat"
    rc, log = run(run_args(workdir, out, "--no_remat"), env_for(8, workdir))
    assert rc == 0, log
    np.testing.assert_allclose(losses(out), losses(reference_run[0]), rtol=2e-5)


def wait_for_step(proc, out, step, timeout=240):
    path = os.path.join(out, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[0]}")
        if os.path.exists(path) and any(logged_step(l) >= step for l in open(path)):
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_kill_and_resume_is_exact(workdir, reference_run):
    expected = final_tensors(reference_run[0])
    env = env_for(8, workdir)

    # 1. SIGKILL while checkpoint 4 is being written in the background (its file written under a temporary
    #    name, not yet renamed into place).
    out = workdir / "crash"
    rc, log = run(run_args(workdir, out), env_for(8, workdir, CRASH_AT=CRASH_WRITING_4))
    assert rc == -signal.SIGKILL, log
    assert "step_00000004 (writing in the background)" in log
    assert sorted(os.listdir(out / "checkpoints")) == ["step_00000002", "step_00000004"]
    assert committed(out) == ["step_00000002"]  # the interrupted write is not taken for complete
    assert "process_00000.safetensors.partial" in os.listdir(out / "checkpoints" / "step_00000004")
    lines = open(out / "metrics.jsonl").readlines()
    with open(out / "metrics.jsonl", "w") as fh:  # a damaged line (not the last), then a line cut by the kill
        fh.writelines(lines[:1] + ["garbage\n"] + lines[1:] + ['{"step": 5, "loss": 3.'])
    rc, log = run(run_args(workdir, out), env)
    assert rc == 0, log
    assert "resuming from" in log and "step_00000002" in log
    assert log.count("are not a step's JSON record") == 1  # the damaged line is named once, and dropped
    assert f"warning: {out / 'metrics.jsonl'}: line(s) [2] are not a step's JSON record; dropped" in log
    # The leftover was replaced, old checkpoints pruned and their files deleted.
    assert committed(out) == sorted(os.listdir(out / "checkpoints")) == ["step_00000004", "step_00000006"]
    assert sorted(os.listdir(out / "checkpoints" / "step_00000006")) == ["meta.json", "process_00000.safetensors"]
    for name, arr in final_tensors(out).items():
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == list(range(1, STEPS + 1))

    # 2. SIGTERM (a preemption notice) writes a checkpoint and exits non-zero; then SIGKILL at another
    #    moment; each restart resumes, and the result is bitwise the uninterrupted run's.
    out = workdir / "preempt"
    p = start(run_args(workdir, out, "--checkpoint_every", "0"), env)
    wait_for_step(p, out, 1)
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 143, log
    assert "SIGTERM" in log
    saved = committed(out)
    assert len(saved) == 1 and os.listdir(out / "checkpoints") == saved
    p = start(run_args(workdir, out, "--checkpoint_every", "0"), env)
    resumed_at = int(saved[0][5:])
    wait_for_step(p, out, resumed_at + 1)
    p.kill()
    p.communicate()
    assert f"pid {p.pid}, " in open(out / ".lock").read()  # the killed run's claim: the lock went with it
    rc, log = run(run_args(workdir, out, "--checkpoint_every", "0"), env)
    assert rc == 0, log
    assert f"resuming from {out / 'checkpoints' / saved[0]}" in log
    for name, arr in final_tensors(out).items():
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)
    steps_logged = [json.loads(l)["step"] for l in open(out / "metrics.jsonl")]
    assert steps_logged == list(range(1, STEPS + 1))  # lines past a checkpoint are replaced, not doubled


def test_failed_background_write_stops_the_run_and_keeps_the_last_checkpoint(workdir):
    # A file where checkpoint 4's directory goes: its background write fails, as on a full or broken disk.
    out = workdir / "write_fails"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step_00000004").write_text("in the way")
    rc, log = run(run_args(workdir, out), env_for(8, workdir))
    assert rc == 1, log
    assert f"alpaca.py: error: writing checkpoint {out / 'checkpoints' / 'step_00000004'} failed on process(es) " \
           "[0]: FileExistsError" in log
    assert f"resumes from the latest, {out / 'checkpoints' / 'step_00000002'}" in log
    assert committed(out) == ["step_00000002"] and not os.path.exists(out / "hf")
    assert max(json.loads(l)["step"] for l in open(out / "metrics.jsonl")) < STEPS  # it stopped early


def wait_stopped(proc, timeout=120):
    """Wait until every thread of proc is stopped (held by a SIGSTOP: state T)."""
    tasks, t0 = f"/proc/{proc.pid}/task", time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[0]}")
        try:
            states = [open(f"{tasks}/{t}/stat").read().rsplit(")", 1)[1].split()[0] for t in os.listdir(tasks)]
        except OSError:  # a thread ended while listing
            states = []
        if states and all(s == "T" for s in states):
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def wait_until(condition, proc, timeout=120):
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[0]}")
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def files_in(out):
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(out) for f in names}


# faults/sitecustomize.py: hold (SIGSTOP) the run just before checkpoint 2's file is renamed into place.
HOLD_WRITING_2 = "os.rename:step_00000002/process_00000.safetensors:1:SIGSTOP"


def test_a_second_run_on_the_same_out_is_refused_and_changes_nothing(workdir, reference_run):
    expected = final_tensors(reference_run[0])
    out = workdir / "busy"
    first = start(run_args(workdir, out), env_for(8, workdir, CRASH_AT=HOLD_WRITING_2))
    try:
        # Held in the middle of writing checkpoint 2: an uncommitted checkpoint that a second run, taking
        # --out, would delete as a crash's leftover, and a metrics.jsonl that it would cut back to step 0.
        wait_stopped(first)
        before = files_in(out)
        assert "checkpoints/step_00000002/process_00000.safetensors.partial" in before
        rc, log = run(run_args(workdir, out), env_for(8, workdir), timeout=90)
        assert rc == 2, log
        assert f"--out {out} is in use by another run (host {os.uname().nodename}, pid {first.pid}, since " in log
        assert "Wait for it to end or stop it, or choose another --out" in log
        assert "loading" not in log and "Traceback" not in log  # refused before the weights are read
        assert files_in(out) == before  # nothing deleted or changed, the lock's claim included
        first.send_signal(signal.SIGCONT)
        log = first.communicate(timeout=120)[0]
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, log
    assert committed(out) == ["step_00000004", "step_00000006"]
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == list(range(1, STEPS + 1))
    for name, arr in final_tensors(out).items():  # the first run went on as if alone
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)


def test_ctrl_c_checkpoints_and_exits_130_and_a_second_ctrl_c_stops_at_once(workdir, reference_run):
    expected = final_tensors(reference_run[0])
    out = workdir / "ctrl_c"
    args = run_args(workdir, out, "--checkpoint_every", "0")

    # 1. Ctrl-C while step 2 runs (the run is held there by a SIGSTOP, so that it cannot end first): a
    #    checkpoint at the end of the step, status 130, no traceback.
    p = start(args, env_for(8, workdir, CRASH_AT="open:metrics.jsonl:2:SIGSTOP"), stderr=subprocess.PIPE)
    try:
        wait_stopped(p)
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGCONT)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, stdout + stderr
    assert "Ctrl-C: stopping after this step with a checkpoint; Ctrl-C again stops at once" in stderr
    saved = re.search(r"^SIGINT: checkpoint written at step (\d+); exiting$", stdout, re.M)
    assert saved, stdout
    saved = f"step_{int(saved[1]):08d}"
    assert "Traceback" not in stdout + stderr and "KeyboardInterrupt" not in stdout + stderr
    assert committed(out) == os.listdir(out / "checkpoints") == [saved]

    # 2. The same command resumes from that checkpoint. Ctrl-C, then Ctrl-C again while the checkpoint the
    #    first asked for is being written (held before its file is renamed into place): the process ends at
    #    once, killed by SIGINT, without a traceback, and that checkpoint is not taken for complete.
    hold = "open:metrics.jsonl:1:SIGSTOP,os.rename:process_00000.safetensors:1:SIGSTOP"
    p = start(args, env_for(8, workdir, CRASH_AT=hold))
    try:
        wait_stopped(p)  # at the first step's record
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGCONT)
        wait_until(lambda: glob.glob(str(out / "checkpoints" / "*" / "process_00000.safetensors.partial")), p)
        wait_stopped(p)  # before that file's rename
        p.send_signal(signal.SIGINT)
        p.send_signal(signal.SIGCONT)
        log = p.communicate(timeout=20)[0]  # at once: no step, no write, no exit handler to wait for
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == -signal.SIGINT, log
    assert f"resuming from {out / 'checkpoints' / saved}" in log
    assert "Ctrl-C: stopping after this step" in log and "checkpoint written at step" not in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert committed(out) == [saved]

    # 3. Ctrl-C before the loop (here while metrics.jsonl is cut back to the checkpoint): status 130, one line.
    rc, log = run(args, env_for(8, workdir, CRASH_AT="open:metrics.jsonl.partial:1:SIGINT"))
    assert rc == 130, log
    assert f"alpaca.py: error: interrupted. Every complete checkpoint is kept; the same command resumes from " \
           f"the latest, {out / 'checkpoints' / saved}" in log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log

    # 4. And again: it resumes from the first Ctrl-C's checkpoint and ends as the uninterrupted run did.
    rc, log = run(args, env_for(8, workdir))
    assert rc == 0, log
    assert f"resuming from {out / 'checkpoints' / saved}" in log
    for name, arr in final_tensors(out).items():
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)
    assert [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == list(range(1, STEPS + 1))


def finished_out(reference_run, to, steps=("step_00000004", "step_00000006"), lock=False):
    """A copy of the reference run's checkpoints `steps` and metrics.jsonl (and its .lock): a finished run."""
    for s in steps:
        shutil.copytree(reference_run[0] / "checkpoints" / s, to / "checkpoints" / s)
    for f in ("metrics.jsonl",) + ((".lock",) if lock else ()):
        shutil.copy(reference_run[0] / f, to / f)
    return to


def test_a_full_disk_stops_the_run_with_one_line_naming_the_file_and_what_is_kept(workdir, reference_run, tmp_path):
    # A real full disk: a small tmpfs that only the run sees, in a private mount namespace.
    if namespace_problem():
        pytest.skip(namespace_problem())
    env = env_for(8, workdir)

    def kept(out):
        return (f"Every complete checkpoint is kept; the same command resumes from the latest, "
                f"{out / 'checkpoints' / 'step_00000006'}, and exports once every step is done.")

    def one_error(log):
        return log.count("alpaca.py: error:") == 1 and "Traceback" not in log

    # 1. The final export on a full disk (--hf_save_path on 256 KB; the float32 model is 1 MB); --out has room.
    out, hf = finished_out(reference_run, tmp_path / "run"), tmp_path / "hf"
    hf.mkdir()
    args = run_args(workdir, out, "--hf_save_path", str(hf))
    rc, log = run_in_namespace(f"mount -t tmpfs -o size=256k tmpfs {q(hf)}", args, env)
    assert rc == 1, log
    assert "all 6 steps are done" in log
    assert f"alpaca.py: error: {hf / 'final' / 'model.safetensors'}: " in log and "No space left on device" in log
    assert kept(out) in log and one_error(log), log
    assert committed(out) == ["step_00000004", "step_00000006"]
    rc, log = run(args, env)  # the same command, with room: resumes at the last step and exports
    assert rc == 0, log
    assert "all 6 steps are done" in log and os.listdir(hf) == ["final"]
    expected = final_tensors(reference_run[0])
    from safetensors.numpy import load_file
    for name, arr in load_file(str(hf / "final" / "model.safetensors")).items():
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)

    # 2. A restart with --out itself on a full disk: its first write, metrics.jsonl cut back to the checkpoint
    #    through a temporary name, fails.
    saved, full = finished_out(reference_run, tmp_path / "saved", ["step_00000006"], lock=True), tmp_path / "full"
    full.mkdir()
    fill = f"{{ dd if=/dev/zero of={q(full / 'fill')} bs=4k 2>/dev/null; true; }}"
    rc, log = run_in_namespace(f"mount -t tmpfs -o size=4m tmpfs {q(full)} && cp -a {q(saved)}/. {q(full)}/ && {fill}",
                               run_args(workdir, full), env)
    assert rc == 1, log
    assert f"alpaca.py: error: {full / 'metrics.jsonl'}: No space left on device. {kept(full)}" in log
    assert one_error(log), log


def test_a_fresh_out_on_a_full_disk_names_the_file(workdir, tmp_path):
    # Its first write, the run's claim in OUT/.lock, fails (the probe of preflight, an empty file, does not).
    if namespace_problem():
        pytest.skip(namespace_problem())
    full = tmp_path / "full"
    full.mkdir()
    fill = f"{{ dd if=/dev/zero of={q(full / 'fill')} bs=4k 2>/dev/null; true; }}"
    rc, log = run_in_namespace(f"mount -t tmpfs -o size=64k tmpfs {q(full)} && {fill}", run_args(workdir, full),
                               env_for(8, workdir))
    assert rc == 1, log
    assert f"alpaca.py: error: {full / '.lock'}: No space left on device. There is no complete checkpoint yet: " \
           "the same command starts afresh." in log
    assert log.count("alpaca.py: error:") == 1 and "Traceback" not in log, log


def test_read_only_out_with_a_damaged_checkpoint_is_refused_and_nothing_deleted(workdir, reference_run, tmp_path):
    out = finished_out(reference_run, tmp_path / "ro")
    newest = out / "checkpoints" / "step_00000006"
    (newest / "process_00000.safetensors").write_bytes((newest / "process_00000.safetensors").read_bytes()[:-100])
    before = files_in(out)
    rc, log = run(run_args(workdir, out), env_for(8, workdir, READ_ONLY=str(out)))  # faults/sitecustomize.py
    assert rc == 2, log
    assert f"alpaca.py: error: --out {out}: not a writable directory (Read-only file system)" in log
    assert "Traceback" not in log
    assert files_in(out) == before and (newest / "meta.json").exists()  # the damaged checkpoint kept


def test_the_progress_line_counts_hours_past_a_day(capsys):
    # A 7B run on small hardware takes days: 999 steps to go at 108 s a step is an ETA of 29 h 58 min.
    from types import SimpleNamespace
    import alpaca
    import llama
    plan = {"order": np.zeros(1000, np.int32), "row_start": np.arange(1001), "rows_per_step": 1, "steps": 1000}
    run = SimpleNamespace(plan=plan, examples={"offsets": np.array([0, 100])}, mc=llama.read_config(STORIES),
                          lc=None, c=alpaca.Config(log_every=1), t_launch=time.time())
    logs = {"path": None, "wandb": None, "peak": None, "t_window": time.time() - 108, "tokens": 0, "flops": 0.0,
            "last_logged": 0}
    alpaca.log_step(run, logs, 0, {"loss": 2.5, "lr": 1e-5, "grad_norm": 0.5, "n_tokens": 50.0})
    line = capsys.readouterr().out
    assert line.startswith("step 1/1000  loss 2.5000") and re.search(r"  eta 29:58:\d\d\n$", line), line


def test_written_files_follow_the_umask(reference_run):
    # As open() makes them: 0o666 & ~umask (0o644 under umask 022); safetensors alone makes 0o600.
    umask = os.umask(0)
    os.umask(umask)  # the test process's, which the runs inherited
    out = reference_run[0]
    files = [os.path.relpath(os.path.join(d, f), out) for d, _, names in os.walk(out) for f in names]
    assert {f: oct(stat.S_IMODE(os.stat(out / f).st_mode)) for f in files} == {f: oct(0o666 & ~umask) for f in files}
    assert {"hf/final/model.safetensors", "hf/final/config.json", "hf/final/tokenizer.model",
            "hf/final/tokenizer_config.json", "checkpoints/step_00000006/process_00000.safetensors",
            "checkpoints/step_00000006/meta.json", "metrics.jsonl", ".lock"} <= set(files)


def test_a_checkpoint_reads_back_on_other_layouts(tmp_path):
    # In process, no training: slices saved from 8 devices, read into 4 (split along the other axis), 3
    # (slices that straddle the saved ones) and 1 device; float32, bfloat16 and a replicated scalar.
    import jax
    import ml_dtypes
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import alpaca
    import llama
    devices = np.array(jax.devices())
    rng = np.random.default_rng(0)
    values = {"w": rng.standard_normal((16, 24)).astype(np.float32),
              "layer": {"b": rng.standard_normal(24).astype(ml_dtypes.bfloat16)}, "count": np.array(7, np.int32)}

    def placed(on, specs):
        shardings = {"w": specs[0], "layer": {"b": specs[1]}, "count": P()}
        return jax.tree.map(lambda x, spec: NamedSharding(Mesh(on, ("d",)), spec), values, shardings)

    state = jax.tree.map(jax.device_put, values, placed(devices, (P(None, "d"), P("d"))))
    c = alpaca.Config(out=str(tmp_path), keep_checkpoints=1)
    alpaca.Checkpointer(c.out, {"note": 1}, c.keep_checkpoints).save(3, state, wait=True)
    assert alpaca.list_checkpoints(str(tmp_path)) == [3]
    # One safetensors file: each distinct slice once (the replicated count too), bfloat16 as it was.
    with safe_open(str(tmp_path / "checkpoints" / "step_00000003" / "process_00000.safetensors"), "numpy") as f:
        assert len(f.keys()) == 8 + 8 + 1 and f.get_slice("layer/b@3").get_dtype() == "BF16"
    assert json.load(open(tmp_path / "checkpoints" / "step_00000003" / "meta.json"))["note"] == 1
    for on, specs in ((devices[:4], (P("d", None), P("d"))), (devices[[5, 2, 7]], (P(None, "d"), P("d"))),
                      (devices[:1], (P(), P()))):
        like = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), values, placed(on, specs))
        back = llama.load_slices(alpaca.checkpoint_dir(str(tmp_path), 3), like)
        for got, want, sh in zip(jax.tree.leaves(back), jax.tree.leaves(values), jax.tree.leaves(like)):
            assert got.sharding == sh.sharding and got.dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(got), want)


def test_children_cannot_rename_directories(tmp_path):
    # What makes every run of these tests a run without directory renames (commands.FAULTS).
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    code = "import os, sys; os.replace(sys.argv[1] + '/f', sys.argv[1] + '/g'); os.rename(sys.argv[1] + '/d', sys.argv[1] + '/e')"
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env_for(1, tmp_path), capture_output=True, text=True)
    assert p.returncode == 1 and "renaming a directory is not supported" in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["d", "g"]


def test_incompatible_checkpoint_is_refused(workdir, reference_run):
    out = reference_run[0]
    rc, log = run(run_args(workdir, out, "--lr", "5e-4"), env_for(8, workdir))
    assert rc == 2
    assert "--lr 0.001 (this run: 0.0005)" in log


def test_changed_data_under_the_same_path_is_refused(workdir, reference_run):
    data = workdir / "data_changed.json"
    records = json.load(open(SAMPLE))
    json.dump(records[:48], open(data, "w"))
    out = workdir / "changed"
    args = run_args(workdir, out, "--steps", "2") + ["--data", str(data)]
    assert run(args, env_for(8, workdir))[0] == 0
    json.dump(records[48:96], open(data, "w"))  # other records, same file name
    rc, log = run(args, env_for(8, workdir))
    assert rc == 2 and "the data (its tokenized examples differ" in log, log


def test_model_without_weights_is_refused_before_anything_is_written(workdir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in ("config.json", "tokenizer.model"):
        (model / f).write_bytes(open(os.path.join(STORIES, f), "rb").read())
    out = tmp_path / "run"
    rc, log = run(run_args(workdir, out) + ["--model", str(model)], env_for(8, workdir))
    assert rc == 2 and f"--model {model}: {model}: no model.safetensors" in log, log
    assert not out.exists()


def test_generate_command_checks_its_flags(reference_run):
    path = os.path.join(reference_run[0], "hf", "final")
    for flags, message in ((["--top_p", "0"], "--top_p must be in (0, 1]"),
                           (["--temperature", "-1"], "--temperature must be >= 0"),
                           (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "alpaca.py"), "generate", "--model", path,
                            "--instruction", "Hi", *flags], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and message in p.stderr, p.stderr


def test_export_loads_in_transformers_with_equal_logits_and_generation(reference_run):
    import jax.numpy as jnp
    import torch
    import transformers
    import llama
    path = os.path.join(reference_run[0], "hf", "final")
    assert {"config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(path))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("Below is an instruction that describes a task.")["input_ids"]
    assert ids[0] == 1  # BOS added, as Llama's tokenizer does
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    c, params = llama.load_hf(path)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(llama.forward(params, jnp.asarray([ids]), c))[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    with torch.no_grad():
        hf_gen = model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    our_gen = llama.generate(params, jnp.asarray([ids]), c, max_new_tokens=32, eos_token_id=-1)
    np.testing.assert_array_equal(np.asarray(our_gen)[0], hf_gen[0, len(ids):].numpy())


def test_export_chat_template_renders_the_training_prompt(reference_run):
    import transformers
    import alpaca
    path = os.path.join(reference_run[0], "hf", "final")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    sp = alpaca.load_tokenizer(path)
    records = json.load(open(SAMPLE))[:48]
    with_input = [r for r in records if r["input"]][:2] + [r for r in records if not r["input"]][:2]
    assert len(with_input) == 4
    for r in with_input:
        messages = [{"role": "user", "content": r["instruction"]}] + \
            ([{"role": "input", "content": r["input"]}] if r["input"] else [])
        prompt = alpaca.format_prompt(r)  # what training puts before the output
        assert tok.apply_chat_template(messages, tokenize=False) == "<s>" + prompt
        ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(ids) == [sp.bos_id()] + sp.encode(prompt)


def test_damaged_checkpoints_are_skipped_with_a_warning_or_named(workdir, reference_run, tmp_path):
    expected = final_tensors(reference_run[0])
    out = tmp_path / "damaged"
    shutil.copytree(reference_run[0] / "checkpoints", out / "checkpoints")  # steps 4 and 6
    shutil.copy(reference_run[0] / "metrics.jsonl", out)
    newest = out / "checkpoints" / "step_00000006" / "process_00000.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # cut short
    rc, log = run(run_args(workdir, out), env_for(8, workdir))
    assert rc == 0, log
    assert f"skipping the damaged checkpoint {out / 'checkpoints' / 'step_00000006'}: {newest}: SafetensorError" in log
    assert f"resuming from {out / 'checkpoints' / 'step_00000004'}" in log
    for name, arr in final_tensors(out).items():  # steps 5 and 6 again, exactly
        np.testing.assert_array_equal(arr, expected[name], err_msg=name)

    # Every checkpoint damaged (a meta.json that is not JSON, a missing file): nothing is resumed or deleted.
    (out / "checkpoints" / "step_00000006" / "meta.json").write_text('{"step": 6, "config"')
    os.remove(out / "checkpoints" / "step_00000004" / "process_00000.safetensors")
    rc, log = run(run_args(workdir, out), env_for(8, workdir))
    assert rc == 2, log
    assert f"--out {out}: every checkpoint there is damaged" in log
    assert f"{out / 'checkpoints' / 'step_00000006' / 'meta.json'}: JSONDecodeError" in log
    assert f"{out / 'checkpoints' / 'step_00000004' / 'process_00000.safetensors'}: FileNotFoundError" in log
    assert committed(out) == ["step_00000004", "step_00000006"]


@pytest.mark.parametrize("flags,message", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
    (["--data", "/nonexistent/data.json"], "--data /nonexistent/data.json"),
    (["--seq_len", "1024", "--max_len", "256"], "--seq_len 1024 is above the model's max_position_embeddings (512)"),
    (["--data_parallel", "3"], "--data_parallel 3: training splits the rows of a step over all 8 devices"),
    (["--model", "nobody/no-such-model"], "--model nobody/no-such-model"),  # a Hub id, offline here
    (["--micro_batch_size", "3"], "--micro_batch_size 3: a micro-batch must divide the 8 rows of a step"),
    (["--log_every", "0"], "--log_every must be at least 1"),
    (["--hf_dtype", "float64"], "--hf_dtype must be float32, bfloat16 or float16"),
    (["--hf_save_path", "/proc/no-such-dir"], "--hf_save_path /proc/no-such-dir: not a writable directory"),
    (["--tokenizer", os.path.join(ASSETS, "llama_tokenizer", "tokenizer.model")],
     "is outside the model's vocabulary of 512"),
    (["--lr=-1e-3"], "--lr must be positive, got -0.001"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
    (["--beta1", "1.0"], "--beta1 must be in [0, 1), got 1.0"),
    (["--beta2=-0.5"], "--beta2 must be in [0, 1), got -0.5"),
    (["--eps=-1e-8"], "--eps must be >= 0, got -1e-08"),
    (["--weight_decay=-0.1"], "--weight_decay must be >= 0, got -0.1"),
    (["--grad_clip", "nan"], "--grad_clip must be >= 0, got nan"),
])
def test_bad_flags_fail_clearly_and_write_nothing(workdir, tmp_path, capsys, flags, message):
    import alpaca  # in this process, on its 8 devices (tests/conftest.py): the checks come before any step
    out = tmp_path / "bad"
    assert alpaca.main(run_args(workdir, out) + flags) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out / "checkpoints") and not os.path.exists(out / "hf")
    if flags[0] != "--hf_save_path":  # found before the run directory is even made
        assert not os.path.exists(out)


def test_hf_save_path_inside_the_checkpoints_is_refused(workdir, tmp_path, capsys):
    import alpaca  # in process: a flag check, before anything is read or written
    out = tmp_path / "run"
    for inside in (out / "checkpoints", out / "checkpoints" / "export", out / "checkpoints" / "step_00000002"):
        assert alpaca.main(run_args(workdir, out, "--hf_save_path", str(inside))) == 2
        assert f"--hf_save_path {inside}: inside {out / 'checkpoints'}, where checkpoint pruning deletes " \
               "directories; choose a path outside it" in capsys.readouterr().err
        assert not out.exists()
    # Anywhere else is taken: these get as far as the model's check (a --seq_len too long for stories260K).
    for outside in (out / "hf", out, out / "checkpoints2", tmp_path / "exports"):
        assert alpaca.main(run_args(workdir, out, "--hf_save_path", str(outside), "--seq_len", "1024")) == 2
        err = capsys.readouterr().err
        assert "--seq_len 1024 is above the model's max_position_embeddings" in err and "--hf_save_path" not in err


@pytest.mark.parametrize("flag", ["out", "hf_save_path", "cache_dir", "model", "tokenizer", "data"])
def test_a_url_where_a_path_is_meant_is_refused(workdir, tmp_path, monkeypatch, capsys, flag):
    import alpaca
    monkeypatch.chdir(tmp_path)  # where os.makedirs("gs://bucket/x") would make a folder "gs:"
    for url in ("gs://bucket/x", "s3://b/x", "hdfs://n/x"):
        assert alpaca.main(run_args(workdir, tmp_path / "run", f"--{flag}", url)) == 2
        assert f"--{flag} {url}: this program reads and writes filesystem paths, not URLs. Mount a bucket (e.g. " \
               "gcsfuse --implicit-dirs BUCKET /mnt/BUCKET) and give a path in it" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    if flag == "data":  # http(s) data is downloaded, not refused (here it fails offline: port 1 refuses at once)
        for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.delenv(var, raising=False)
        for url in ("https://127.0.0.1:1/alpaca.json", "http://127.0.0.1:1/alpaca.json"):
            assert alpaca.main(run_args(workdir, tmp_path / "run", "--data", url)) == 2
            err = capsys.readouterr().err
            assert f"--data {url}: the download failed" in err and "not URLs" not in err


def test_generate_on_a_training_checkpoint_names_the_export(reference_run, capsys):
    import alpaca
    out = reference_run[0]
    checkpoint = out / "checkpoints" / "step_00000006"
    assert alpaca.main(["generate", "--model", str(checkpoint), "--instruction", "Hi"]) == 2
    assert f"--model {checkpoint}: a training checkpoint; generation takes a Hugging Face export, e.g. " \
           f"{out / 'hf' / 'final'}" in capsys.readouterr().err


def test_unwritable_out_is_named(workdir):
    blocker = workdir / "file"
    blocker.write_text("not a directory")
    rc, log = run(run_args(workdir, blocker / "run"), env_for(1, workdir))
    assert rc == 2 and f"--out {blocker / 'run'}" in log


def test_generate_command_answers_through_the_template(reference_run):
    path = os.path.join(reference_run[0], "hf", "final")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "alpaca.py"), "generate", "--model", path,
                        "--instruction", "Give three tips for staying healthy.", "--max_new_tokens", "24"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == 0, p.stderr
    import alpaca
    import llama
    import jax.numpy as jnp
    c, params = llama.load_hf(path)
    sp = alpaca.load_tokenizer(path)
    prompt = [sp.bos_id()] + sp.encode(alpaca.format_prompt({"instruction": "Give three tips for staying healthy."}))
    ids = [int(t) for t in np.asarray(llama.generate(params, jnp.asarray([prompt]), c, max_new_tokens=24,
                                                     eos_token_id=sp.eos_id()))[0]]
    ids = ids[:ids.index(sp.eos_id())] if sp.eos_id() in ids else ids
    assert p.stdout.strip() == sp.decode(ids).strip() != ""


def test_demo_preset_runs_end_to_end(workdir):
    out = workdir / "demo"
    rc, log = run(["--preset", "demo", "--steps", "3", "--out", str(out), "--cache_dir", str(workdir / "cache"),
                   "--sample_tokens", "16", "--tokenizer", os.path.join(STORIES, "tokenizer.model")],
                  env_for(1, workdir), timeout=600)
    assert rc == 0, log
    assert "step 3/3" in log and "### Response" in log
    assert os.path.exists(out / "hf" / "final" / "model.safetensors")
    assert open(out / "hf" / "final" / "tokenizer.model", "rb").read() == open(os.path.join(STORIES, "tokenizer.model"), "rb").read()


def test_diverging_loss_stops_the_run_and_keeps_the_last_good_checkpoint(workdir):
    out = workdir / "diverge"
    rc, log = run(run_args(workdir, out, "--lr", "1e30", "--warmup_ratio", "0", "--grad_clip", "0",
                           "--checkpoint_every", "1"), env_for(8, workdir))
    assert rc == 1, log
    assert "training diverged" in log
    bad_step = int(log.split("training diverged")[0].rsplit("step ", 1)[1].split(":")[0])
    assert bad_step >= 2  # step 1's loss is computed before the first (huge) update, so it is finite
    saved = sorted(os.listdir(out / "checkpoints"))
    assert saved and saved[-1] == f"step_{bad_step - 1:08d}"  # nothing written for the diverged step
    assert not os.path.exists(out / "hf")
