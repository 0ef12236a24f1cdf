"""What a FLARE site with a given ``class_allow_list`` decides for a component config, asked of
nvflare's own authorizer (nvflare/app_common/widgets/component_path_authorizer.py)."""

import json
from pathlib import Path

from nvflare.apis.fl_exception import UnsafeComponentError
from nvflare.app_common.widgets.component_path_authorizer import ComponentPathAuthorizer


class _SiteWorkspace:  # the one thing the authorizer asks of a site workspace: its resources file
    def __init__(self, path: Path):
        self.path = path

    def get_resources_file_path(self):
        return str(self.path)


def site_allows(component: dict, allow_list: list[str], resources: Path) -> bool:
    """True when a site whose local/resources.json (written to ``resources``) has this list admits it."""
    resources.write_text(json.dumps({"format_version": 2, "class_allow_list": allow_list}))
    try:
        ComponentPathAuthorizer().authorize_component_config(component, workspace=_SiteWorkspace(resources))
        return True
    except UnsafeComponentError:
        return False
