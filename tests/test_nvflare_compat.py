"""Canary for components/flare/nvflare_compat.py: the private NVFlare names it relies on exist in
the installed nvflare with the shape it uses. A new NVFlare release that moves one fails here,
naming it, instead of deep inside a FLARE job."""

import inspect

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.recipe import spec
from nvflare.tool.poc import poc_commands

from flare_lora.components.flare import nvflare_compat


def test_export_flag_is_the_one_nvflare_took_off_the_command_line(monkeypatch):
    assert nvflare_compat.export_requested() is False  # pytest's command line has no --export
    monkeypatch.setattr(spec, "_RECIPE_EXPORT", True)  # what `job.py --export` leaves at import time
    assert nvflare_compat.export_requested() is True


def test_poc_service_functions_take_the_arguments_we_pass():
    start = inspect.signature(poc_commands._start_poc).parameters
    assert {"poc_workspace", "gpu_ids", "excluded", "services_list"} <= set(start)
    wait = inspect.signature(poc_commands._wait_for_poc_system_ready).parameters
    assert "timeout_in_sec" in wait and len(wait) >= 6
    assert callable(poc_commands.setup_service_config)


def test_executor_backend_hooks_exist():
    for name in ("_create_backend", "_build_backend_context"):
        assert callable(getattr(ClientAPIExecutor, name, None)), name
    assert "self._backend = self._create_backend()" in inspect.getsource(ClientAPIExecutor)


class _Controller(ModelController):
    def run(self):
        """Never run: only constructed."""


def test_controller_poll_period_is_read():
    controller = _Controller(persistor_id="")
    assert nvflare_compat.task_check_period(controller) == controller._task_check_period > 0


def test_poc_env_admin_session_hooks_exist():
    from nvflare.recipe import PocEnv

    assert callable(getattr(PocEnv, "_get_session_manager", None))
    assert "self._session_manager = None" in inspect.getsource(PocEnv)
