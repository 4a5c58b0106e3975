"""The ``icl-lens`` command line: one module per subcommand (see :mod:`icl_lens.cli.main`)."""

from icl_lens.cli.main import SUBCOMMANDS, build_parser, main
from icl_lens.errors import UserError

__all__ = ["SUBCOMMANDS", "UserError", "build_parser", "main"]
