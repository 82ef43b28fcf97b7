"""`trl-safeppo run` under the FSDP2 test harness: `accelerate launch --config_file recipes/accelerate/fsdp2.yaml
--num_processes 2 tests/pipeline/_fsdp2_run.py RECIPE` runs the recipe as `-m trl_safeppo run RECIPE` would, with
accelerate's CPU refusal of FSDP patched first (tests/trainers/_fsdp2_cpu.py; a test harness, not the package).
Not collected by pytest (the name starts with an underscore)."""

import sys

from tests.trainers._fsdp2_cpu import enable

enable()

from trl_safeppo.cli import main  # noqa: E402

sys.exit(main(["run", *sys.argv[1:]]))
