"""moto's S3 server with conditional writes made atomic, as they are on S3.

moto 5 checks `If-None-Match: *` / `If-Match` on a PUT and stores the object later in the same
request, with no lock between, while its server answers requests on many threads: two
conditional creates of one key could both succeed (seen once in 200 racing callers,
`test_create_exclusive_race_processes[s3]`). S3 itself decides a conditional write
atomically, and `_fs.create_exclusive` is tested against that contract, so this runs the
check and the store under one lock. Unconditional writes are untouched.

    python tests/moto_s3.py -H 127.0.0.1 -p PORT      # what the s3_server fixture runs
"""

from __future__ import annotations

import sys
import threading

from moto.s3.responses import S3Response
from moto.server import main

_conditional = threading.Lock()
_put_object = S3Response.put_object


def _atomic_put_object(self):
    if self.headers.get("If-None-Match") or self.headers.get("If-Match"):
        with _conditional:
            return _put_object(self)
    return _put_object(self)


S3Response.put_object = _atomic_put_object

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
