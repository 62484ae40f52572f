import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from ae_testlib.pack import register_pack  # noqa: E402

register_pack()

import torch  # noqa: E402

# One thread: on the shared 2-core machine two threads were 4-30x slower at times (design.md).
torch.set_num_threads(1)
