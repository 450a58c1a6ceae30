"""
What every script shares, written once: the error path, settings from the command line, device and
precision, and files that are never half written (atomic writes, folder swaps, one run per folder).

    from common import die, setting, parse_flags, pick_device, atomic_write

torch is imported inside the functions that need it, so prepare.py starts without it.
"""
import argparse
import contextlib
import ctypes
import dataclasses
import json
import math
import os
import shutil
import sys
import types
import typing
from pathlib import Path

# --- The error path -------------------------------------------------------------------------------
_progress_shown = False  # a progress line drawn with \r is on screen: the next message needs a new line

def progress(text):
    """Redraw the one progress line on stderr (callers draw it at most a few times a second)."""
    global _progress_shown
    print("\r" + text, end="", file=sys.stderr, flush=True)
    _progress_shown = True

def end_progress():
    """Move past the progress line, if one is on screen."""
    global _progress_shown
    if _progress_shown:
        print(file=sys.stderr, flush=True)
    _progress_shown = False

def die(message):
    """A user error: one line naming the problem and the fix, exit code 2, no traceback."""
    end_progress()
    print(f"error: {message}", file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:  # under torchrun: its failure summary, the last thing it prints, shows this file
        write_error_file(path, f"error: {message}")
    sys.exit(2)

def write_error_file(path, text):
    """The file torch.distributed.elastic's @record writes for an exception (the same JSON layout),
    written for our one-line error: torchrun's root-cause summary then ends with the reason rather
    than a ChildFailedError traceback with the line 30 lines above it."""
    import time
    with contextlib.suppress(OSError), open(path, "w") as f:
        json.dump({"message": {"message": text, "extraInfo": {"py_callstack": text,
                                                              "timestamp": str(int(time.time()))}}}, f)

def one_line(e):
    """An exception as a short single line, for messages that quote it."""
    return " ".join(str(e).split())[:300] or type(e).__name__

def printable(text):
    """text safe for a terminal: control characters (ESC, which starts a terminal command, \\r, ...)
    shown as \\x.. escapes; newlines and tabs kept. For text that comes from a model or a user."""
    return "".join(c if c.isprintable() or c in "\n\t" else f"\\x{ord(c):02x}" for c in text)

def run_main(main):
    """Run main(argv) as a script: Ctrl-C, a closed pipe and a failing disk end without a traceback."""
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        end_progress()
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader left early (python sample.py | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit must not fail too
        sys.exit(1)
    except OSError as e:  # a disk that filled up, a folder that went read-only, ...
        die(f"{e.filename or 'a file'}: {e.strerror or one_line(e)}")
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and type(e).__name__ != "OutOfMemoryError":
            raise
        die(f"out of memory ({one_line(e)[:120]}); use a smaller --batch-size (the same --batch-tokens keeps "
            "the steps the same) or a smaller model")

# --- Settings: dataclass fields become --flags ----------------------------------------------------
def setting(default, help, **kwargs):
    """A dataclass field that is also a command-line flag; help says what it means."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})

def check(ok, message):
    """For __post_init__ checks: a ValueError that parse_config turns into a one-line error."""
    if not ok:
        raise ValueError(message)

def flag(name):
    return "--" + name.replace("_", "-")

def _caster(kind):
    """The str -> value function of a field type; its errors read '--flag: <message>'."""
    def cast(text):
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
        try:
            value = float(text.replace("_", "")) if kind in (int, float) else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if kind is float and not math.isfinite(value):  # NaN passes every `<` check: refuse it here
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if kind is int:  # 1e9 and 2_000_000 are fine for token counts, 0.5 is not
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
            value = int(value)
        return value
    return cast

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors take the one error path too
        die(f"{message} (python {self.prog} --help lists the settings)")

def parse_flags(argv, configs, doc, epilog="", helps=None):
    """--name=value or --name value for every field of the config dataclasses (a bare --name sets a
    bool; --field_name works too) -> {field: value} of the flags given, cast by field type. --help
    prints every setting with its default and meaning (field metadata, or helps[name])."""
    prog = os.path.basename(sys.argv[0]) or "script"
    parser = _Parser(prog=prog, usage=f"python {prog} [--setting=value ...]", description=doc, epilog=epilog,
                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                     argument_default=argparse.SUPPRESS)  # absent flags stay absent: presets can fill them
    for config in configs:
        group = parser.add_argument_group(f"{config.__name__} settings")
        for f in dataclasses.fields(config):
            kind, meta = f.type, dict(f.metadata)
            if isinstance(kind, types.UnionType):  # int | None -> int
                kind = next(k for k in typing.get_args(kind) if k is not type(None))
            help = meta.pop("help", None) or (helps or {}).get(f.name, "")
            kwargs = dict(help=f"{help} (default: {f.default!r})".replace("%", "%%"), **meta)
            if kind is bool:
                kwargs.update(nargs="?", const=True, metavar="BOOL")
            elif typing.get_origin(kind) is list:
                kwargs.update(nargs="+", metavar="TEXT")
            else:
                kwargs.setdefault("metavar", {int: "N", float: "X"}.get(kind, "TEXT"))
            kwargs.setdefault("type", _caster(str if typing.get_origin(kind) is list else kind))
            group.add_argument(flag(f.name), **kwargs)
    # --field_name is --field-name; only the name part of --name=value changes
    argv = [a.split("=", 1)[0].replace("_", "-") + a[len(a.split("=", 1)[0]):] if a.startswith("--") else a
            for a in argv]
    given, unknown = parser.parse_known_args(argv)
    if unknown:
        valid = " ".join(flag(f.name) for c in configs for f in dataclasses.fields(c))
        die(f"unknown setting {unknown[0]!r}; valid settings: {valid}")
    return {k.replace("-", "_"): v for k, v in vars(given).items()}

def parse_config(config, values):
    """config(**values), with a bad value (its __post_init__ check) as a one-line error."""
    try:
        return config(**values)
    except (TypeError, ValueError) as e:
        die(f"{one_line(e)}; fix the settings")

# --- Device and precision -------------------------------------------------------------------------
def pick_device(name="auto"):
    """torch.device by name; auto: cuda, else mps, else cpu. A device this machine lacks is an error."""
    import torch
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)  # fails for a device that is not here (cuda without a GPU, cuda:7)
    except (RuntimeError, AssertionError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        die(f"--device={name} is unknown or not on this machine; use auto, cpu, cuda, cuda:N or mps")
    return device

def pick_dtype(name, device):
    """The autocast dtype by name; auto: bf16 on GPUs and on CPUs that multiply it natively (chosen by
    capability, not by timing: the same on every run), fp16 on older GPUs, fp32 elsewhere (MPS too)."""
    import torch
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    import hardware  # (as a module: tests can stand in for the CPU's flags)
    return torch.bfloat16 if device.type == "cpu" and hardware.cpu_has_bf16() else torch.float32

def autocast(device, dtype):
    """Low precision where it is safe: matmuls in dtype, weights and reductions stay fp32."""
    import torch
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

# --- Files: atomic writes, folder swaps, one run per folder ---------------------------------------
def download(url, path, hint):
    """url saved at path, fetched once; a failed fetch is one line ending in hint and leaves no file."""
    import urllib.request
    if not os.path.exists(path):
        print(f"downloading {url} to {path}", file=sys.stderr)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        try:
            urllib.request.urlretrieve(url, f"{path}.tmp")
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                os.remove(f"{path}.tmp")
            die(f"cannot download {url}: {one_line(e)}; {hint}")
        os.replace(f"{path}.tmp", path)
    return path

@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open path for writing all at once: the data goes to path.tmp, is fsynced and renamed over
    path. A crash leaves the old path intact; a failed write (disk full) is a one-line error that
    also leaves no .tmp behind."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else
                  "the write failed; is the disk full?")
        die(f"cannot write {path}: {reason}; {path} is as it was before")
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_folder(os.path.dirname(os.path.abspath(path)))  # make the rename itself durable

def fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

_held_locks = {}  # a folder's real path -> (its lock file, the open descriptor that holds the lock)

def lock(folder, what):
    """Make this process the only writer of folder (which need not exist yet) until it exits, by an
    exclusive lock on the file .<name>.lock beside it. The lock is taken on the folder's real path
    (symlinks resolved), so two names of one folder share it. The kernel drops the lock when the
    process dies, so a killed run never blocks the next; an orderly exit also removes the file. A
    second run gets a one-line error with the first one's pid."""
    import atexit
    import fcntl
    folder = Path(folder).resolve()
    if folder in _held_locks:
        return
    if folder.parent == folder:
        die(f"{what} {folder} is the root folder; choose a folder of its own")
    path = folder.parent / f".{folder.name}.lock"
    while True:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            die(f"cannot write {folder.parent}: {e.strerror}; choose another {what}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            die(f"{folder} is in use by another run (pid {pid}); wait for it to finish or choose another {what}")
        # The run before us may have removed the file as it exited, after we opened it: then our
        # lock is on a file nobody else can open. Only a lock on the file at path counts.
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    if not _held_locks:
        atexit.register(release_locks)
    _held_locks[folder] = (path, fd)

def release_locks():
    """At exit: remove the lock files, each while still holding its lock, so no run can slip in between."""
    for path, fd in _held_locks.values():
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
    _held_locks.clear()

def own_folder(folder, what):
    """folder, resolved, if it may be replaced whole: not the current folder or one that holds it
    (swapping it away would pull the floor from under this process and the user's shell)."""
    folder = Path(folder).resolve()
    if folder == Path.cwd().resolve() or folder in Path.cwd().resolve().parents:
        die(f"{what} {folder} is the current folder or holds it; name a folder of its own, e.g. {what} out/new")
    return folder

def file_in(folder, name, what):
    """folder/name for a file name that a file in folder gives (meta.json, an index): a plain name,
    and not a symbolic link, so a damaged or hostile folder cannot make us read elsewhere."""
    if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name or "\\" in name:
        die(f"{what} names {name!r}, not a plain file name in {folder}; it is damaged: write it again")
    path = os.path.join(folder, name)
    if os.path.islink(path):
        die(f"{path} is a symbolic link; copy the file into {folder} instead")
    return path

def swap_in(new, final):
    """Put the finished folder new in place of final in one step, then delete the old one: at every
    instant final is either the old folder or the new one. Linux does it with one renameat2
    (RENAME_EXCHANGE); elsewhere two renames leave a moment with no final."""
    new, final = Path(new), Path(final)
    if final.is_dir():
        libc = ctypes.CDLL(None, use_errno=True)
        exchange = getattr(libc, "renameat2", None)
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if exchange is None or exchange(AT_FDCWD, bytes(new), AT_FDCWD, bytes(final), RENAME_EXCHANGE) != 0:
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            new.rename(final)
            new = old
        shutil.rmtree(new)  # now the old folder
    else:
        new.rename(final)
    fsync_folder(final.parent)
