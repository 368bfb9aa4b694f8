"""The hub's /v1 routes, one `APIRouter` per area, each a thin skin over `HubService`:
enrolment and nodes (`nodes`), studies, rounds and work (`studies`), model versions
(`models`), the SecAgg+ stages and CKKS key ceremony (`secure`), people and API tokens
(`people`), the dashboard's data and page (`dashboard`). `aipipe.hub.app.create_app` includes
them in that order; what they share (who is
asking, long-poll wake-ups) is in `deps`.
"""

from __future__ import annotations

from aipipe.hub.openapi import DOCS
from aipipe.hub.roles import RouteRoles, route_roles
from aipipe.hub.routes.dashboard import router as dashboard
from aipipe.hub.routes.models import router as models
from aipipe.hub.routes.nodes import router as nodes
from aipipe.hub.routes.people import router as people
from aipipe.hub.routes.secure import router as secure
from aipipe.hub.routes.studies import router as studies

ROUTERS = (nodes, studies, models, secure, people, dashboard)

__all__ = ["ROUTERS", "route_table"]


def route_table() -> list[RouteRoles]:
    """Every /v1 route, /openapi.json and the probes with the roles that may call them (the
    README's table: `aipipe.hub.roles.markdown_table`). CDS Hooks routes are not in it: they take
    the CDS client's JWT, never a hub token."""
    return route_roles((*ROUTERS, DOCS))
