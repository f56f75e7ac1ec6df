from pathlib import Path
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning_clara import CLARACallback
from test_callback import LRRecorder, make_trainer, sgd, csv_series, RecordingLogger

def test_x(make_module, trainer_kwargs, tmp_path):
    for every in (1, 2):
        module = make_module(sgd())
        cb, rec = CLARACallback(c=0.2, d=0.05), LRRecorder()
        logger = RecordingLogger()
        tr = make_trainer(trainer_kwargs, [cb, rec], max_epochs=2, accumulate_grad_batches=3, logger=logger, log_every_n_steps=every)
        tr.fit(module)
        print(every, tr.global_step, cb.controllers[0].num_adapted_steps)
        for r in logger.records:
            print(r)
        print(rec.first_group())
