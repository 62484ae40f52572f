import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from ae_testlib.pack import register_pack  # noqa: E402

register_pack()
