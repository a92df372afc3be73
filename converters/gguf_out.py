"""Writing a GGUF file tensor by tensor without ever leaving a half-written file where the result belongs.

    w = gguf.GGUFWriter(None, arch)      # metadata and tensor infos added as usual
    with streamed_gguf(w, out):          # header, metadata and tensor infos are written to a temporary file
        for data in tensors_in_info_order:
            w.write_tensor_data(data)    # one tensor in memory at a time
    # here out is complete; on any exception (Ctrl-C included) the temporary file is gone and out untouched
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf


@contextlib.contextmanager
def streamed_gguf(w: gguf.GGUFWriter, out: Path, *, before_replace: Callable[[], None] | None = None) -> Iterator[Path]:
    """Write w's header, metadata and tensor infos to a temporary file beside out and yield its path for the caller
    to write the tensor data (w.write_tensor_data, in the order the infos were added); then close it and rename it
    to out, with the permissions a new file gets (umask), after before_replace() (which may raise to refuse)."""
    out = Path(out)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        yield tmp
        w.close()
        if before_replace is not None:
            before_replace()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
