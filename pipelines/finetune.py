"""Fine-tune one downstream task with one set of frozen adapters.

    accelerate launch -m pipelines.finetune --config configs/sample.yaml --task typing --adapters fac,lin

--task: typing (OpenEntity), figer, csqa, cosmosqa, tacred. --adapters: none, fac, lin,
fac,lin (adapter directories from --finetune.fac_adapter / --finetune.lin_adapter,
default runs/<preset>/fac-adapter and lin-adapter), fusion (fac and lin joined by
AdapterFusion), multitask (the multitask-trained encoder, no adapters), or serial-fac,
serial-lin (serial adapters inserted into the encoder, from --finetune.serial_fac_adapter /
serial_lin_adapter). Per-task settings are overridden
as --finetune.<task>.<key> value (e.g. --finetune.tacred.learning_rate 1e-5).

The encoder and the task head train; the adapters stay frozen. The checkpoint with the
best dev score is selected (dev only), then dev and test are predicted once. Writes
runs/<preset>/finetune/<task>/<variant>/: predictions.jsonl (test),
dev_predictions.jsonl, metrics.json (scored from those files), manifest.json, the
training curves and the selected weights (kadapter/finetune.py has the details).
"""

from __future__ import annotations

from kadapter.config import Config

from .common import run_stage


def main(config: Config) -> None:
    from kadapter.finetune import run_finetune

    run_finetune(config, config.finetune.task, config.finetune.adapters)


if __name__ == "__main__":
    run_stage("pipelines.finetune", "finetune", main)
