"""``RestartingExecutor``: nvflare's ClientAPIExecutor, plus a new trainer when the last one died.

nvflare 2.9 launches a site's external training process once per job. Once that process is gone
(killed, out of memory, a CUDA or NCCL error) the executor fails every later task of the job at
that site, so the site sits out the rest of the job. This executor instead replaces the failed
trainer with a freshly launched one at the site's next task, at most ``max_restarts`` times per
job. The new trainer holds no global state; the server's controllers send a site whose last
result went missing everything it lacks (FLoRA: every stacked round, merged into the same base
weights as at the other sites; averaging: the current global; selective: every global layer),
so it catches up within the job.

For a job without code it starts only the plugin's training entry point (launch_command.py): a
job that set any other command is refused at the site before anything is launched.
"""

from __future__ import annotations

import os
import shlex

import torch

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
from nvflare.security.logging import secure_format_exception

from flare_lora.components.flare.launch_command import check_app_files, check_plugin_command, job_has_code, site_command
from flare_lora.components.flare.nvflare_compat import launch_command, relaunch_backend, set_launch_command
from flare_lora.components.site_local import SiteLocal
from flare_lora.components.training.config import ConfigError

# what a task ends with when its trainer is gone (or its session broke) rather than after a result
TRAINER_LOST = (ReturnCode.EXECUTION_EXCEPTION, ReturnCode.TASK_ABORTED)


class RestartingExecutor(ClientAPIExecutor):
    def __init__(self, *args, max_restarts: int = 3, **kwargs):
        """Args: those of ClientAPIExecutor (``execution_mode="external_process"``), and
        max_restarts: new trainers this site may launch per job after a task failed (0: none).
        """
        if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) or max_restarts < 0:
            raise ValueError(f"max_restarts: expected an integer >= 0, got {max_restarts!r}")
        super().__init__(*args, **kwargs)
        if self.execution_mode != ExecutionMode.EXTERNAL_PROCESS:
            raise ValueError(f"execution_mode: RestartingExecutor needs 'external_process', got {self.execution_mode!r}")
        self.max_restarts = max_restarts
        self.restarts = 0
        self.failed_task = ""  # the task that failed last, until a new trainer is up

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            custom = fl_ctx.get_engine().get_workspace().get_app_custom_dir(fl_ctx.get_job_id())
            if not job_has_code(custom):
                try:
                    check_app_files(os.path.dirname(custom))
                    argv = site_command(check_plugin_command(launch_command(self)), site_max_processes(fl_ctx))
                    set_launch_command(self, shlex.join(argv))
                except (ValueError, ConfigError) as e:
                    self.system_panic(f"refusing this job at this site: it carries no code, so it may only start "
                                      f"flare-lora's training entry point: {e}", fl_ctx)
                    return
        super().handle_event(event_type, fl_ctx)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.failed_task and self.restarts < self.max_restarts and not self._relaunch(task_name, fl_ctx):
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        reply = super().execute(task_name, shareable, fl_ctx, abort_signal)
        if reply.get_return_code() in TRAINER_LOST:
            self.failed_task = task_name
            if self.restarts >= self.max_restarts:  # from here on, nvflare's own behaviour
                self.log_error(fl_ctx, f"task '{task_name}' failed at this site; no new trainer: "
                                       f"max_restarts={self.max_restarts} used up")
        return reply

    def _relaunch(self, task_name: str, fl_ctx: FLContext) -> bool:
        """Finalize the backend of the failed trainer and start one with a new trainer."""
        self.restarts += 1
        self.log_warning(fl_ctx, f"task '{self.failed_task}' failed at this site; launching a new trainer "
                                 f"for task '{task_name}' (restart {self.restarts} of {self.max_restarts})")
        try:
            relaunch_backend(self, fl_ctx)
        except Exception as e:
            self.log_error(fl_ctx, f"restart {self.restarts} of the trainer failed: {secure_format_exception(e)}")
            return False
        self.failed_task = ""
        return True


def site_max_processes(fl_ctx: FLContext) -> int:
    """The most training processes a job may start here: the site's max_gpus, else its GPU count."""
    root = fl_ctx.get_engine().get_workspace().get_root_dir()
    limit = SiteLocal.load(root, fl_ctx.get_identity_name()).max_gpus
    return limit if limit is not None else max(1, torch.cuda.device_count())
