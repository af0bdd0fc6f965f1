"""The MLflow model registry: every evaluated model becomes a version; the alias ``champion`` marks the best.

Each version carries, as tags: ``metric.<name>`` (the evaluation numbers), ``params.<section>``
(JSON), ``data_hash`` (manifest of the preprocessed data), ``val_data_hash`` (the validation
split's index + categories: what the AP was measured on), ``git_commit``, ``code_sha256`` (the
hash of the code the model runs when loaded, `pipeline.tracking.code_hash`, copied from the run
that logged it: the loader refuses a version whose downloaded code differs), and its history:
``status`` (``champion`` | ``rejected`` | ``retired`` once a better one takes over),
``compared_with`` (e.g. ``version 3 AP 0.4120``) and ``decision`` (the reason, also the version's
description). Stages (Staging/Production) are deprecated in MLflow 3: aliases only.

Champion policy (`decide_champion`), on AP (IoU .50:.95):

1. No champion yet: the new version becomes champion.
2. The champion was evaluated on the same validation data (``val_data_hash`` equal): the new
   version takes over only if its AP is strictly higher; otherwise it is rejected.
3. The champion was evaluated on different validation data: the two APs are not comparable.
   The newest validation data is taken as authoritative, so the new version is compared with the
   best earlier version evaluated on the SAME data as itself: it becomes champion if there is none
   (the first model measured on this data) or if it beats it; otherwise it is rejected and the
   champion stays. (To compare across data, re-evaluate the champion on the new data.)

Every function takes the client to use (`pipeline.tracking.run.mlflow_client`): nothing here sets
MLflow's global tracking or registry URI. Concurrent registrations of the same name are not
serialised: run one evaluation at a time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.tracking.code_hash import CODE_SHA256_TAG
from pipeline.tracking.fluent import global_tracking_uri

log = logging.getLogger(__name__)

CHAMPION = "champion"
METRIC_TAG_PREFIX = "metric."
VAL_DATA_TAG = "val_data_hash"


@dataclass(frozen=True)
class Decision:
    """Outcome of `decide_champion`: the new version's status and why."""

    status: str  # "champion" | "rejected"
    compared_with: str  # e.g. "version 3 AP 0.4120", or "none"
    reason: str
    previous_champion: str | None = None  # version that loses the alias, if any


@dataclass(frozen=True)
class Registration:
    """A registered version and the champion decision taken for it."""

    name: str
    version: str
    decision: Decision
    model_uri: str  # models:/<name>/<version>


def version_ap(version: ModelVersion) -> float | None:
    """The AP tag of a version, or None when it has none (registered by something else)."""
    value = version.tags.get(f"{METRIC_TAG_PREFIX}AP")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def get_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version holding the ``champion`` alias, or None."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
            return None
        raise


def decide_champion(client: MlflowClient, name: str, new: ModelVersion) -> Decision:
    """Apply the module's champion policy to version ``new`` (tags already set); changes nothing."""
    new_ap = version_ap(new)
    if new_ap is None:
        raise ValueError(f"model {name} version {new.version} has no {METRIC_TAG_PREFIX}AP tag")
    new_data = new.tags.get(VAL_DATA_TAG)
    champion = get_champion(client, name)
    if champion is None or champion.version == new.version:
        return Decision(CHAMPION, "none", "first evaluated version: no champion yet")
    champion_ap = version_ap(champion)
    label = (
        f"version {champion.version} AP {champion_ap:.4f}"
        if champion_ap is not None
        else f"version {champion.version}"
    )
    if champion.tags.get(VAL_DATA_TAG) == new_data and champion_ap is not None:
        if new_ap > champion_ap:
            reason = f"AP {new_ap:.4f} > champion {label} on the same validation data"
            return Decision(CHAMPION, label, reason, previous_champion=champion.version)
        return Decision(
            "rejected", label, f"AP {new_ap:.4f} does not beat champion {label} on the same validation data"
        )

    # Different validation data: compare only with versions measured on the new version's data.
    same_data = [
        mv
        for mv in client.search_model_versions(f"name = '{name}'")
        if mv.version != new.version and mv.tags.get(VAL_DATA_TAG) == new_data and version_ap(mv) is not None
    ]
    changed = (
        f"validation data changed (champion {label} was evaluated on "
        f"{str(champion.tags.get(VAL_DATA_TAG, 'unknown'))[:12]}, this version on {str(new_data)[:12]})"
    )
    if not same_data:
        return Decision(CHAMPION, label, f"{changed}; first version measured on this data", champion.version)
    best = max(same_data, key=lambda mv: version_ap(mv) or -1.0)
    best_label = f"version {best.version} AP {version_ap(best):.4f}"
    if new_ap > (version_ap(best) or -1.0):
        return Decision(
            CHAMPION,
            best_label,
            f"{changed}; AP {new_ap:.4f} beats {best_label} on this data",
            champion.version,
        )
    return Decision(
        "rejected", best_label, f"{changed}; AP {new_ap:.4f} does not beat {best_label} on this data"
    )


def _tag_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text[:5000]  # MLflow's limit on a tag value


def _create_registered_model(client: MlflowClient, name: str) -> None:
    """Create registered model ``name`` unless it exists."""
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _logged_model_id(model_uri: str) -> str | None:
    """``m-...`` for a logged model's URI ``models:/m-...``, else None."""
    prefix = "models:/"
    rest = model_uri[len(prefix) :] if model_uri.startswith(prefix) else ""
    return rest if rest and "/" not in rest and "@" not in rest else None


def logged_code_sha256(client: MlflowClient, model_uri: str) -> str | None:
    """The code hash (tag ``code_sha256``) of the run that logged ``model_uri`` (``models:/<model id>``
    or ``runs:/<run id>/<name>``), or None when there is none."""
    model_id = _logged_model_id(model_uri)
    if model_id is not None:
        run_id = client.get_logged_model(model_id).source_run_id
    elif model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/") :].strip("/").split("/", 1)[0]
    else:
        return None
    return client.get_run(run_id).data.tags.get(CODE_SHA256_TAG) if run_id else None


def register_model(
    client: MlflowClient,
    model_uri: str,
    *,
    name: str,
    metrics: Mapping[str, float],
    params: Mapping[str, Any],
    data_hash: str | None,
    val_data_hash: str,
    git_commit: str | None,
    extra_tags: Mapping[str, Any] | None = None,
    code_sha256: str | None = None,
) -> Registration:
    """Register ``model_uri`` (e.g. a logged model's ``models:/m-...``) as a new version of ``name``
    through ``client``, tag it, decide the champion (module docstring) and move the alias; returns
    what was done.

    ``metrics`` must hold ``AP``. ``params`` maps a section name to its values (tagged as JSON).
    ``code_sha256`` (default: the logging run's tag, `logged_code_sha256`) is tagged on the version;
    without one the version is registered untagged, with a warning: loading it needs a pinned hash.
    """
    if "AP" not in metrics:
        raise ValueError("register_model: metrics lack 'AP', the champion criterion")
    tags: dict[str, str] = {f"{METRIC_TAG_PREFIX}{k}": f"{float(v):.6g}" for k, v in metrics.items()}
    tags.update({f"params.{section}": _tag_value(values) for section, values in params.items()})
    tags[VAL_DATA_TAG] = val_data_hash
    tags["data_hash"] = data_hash or "unknown"
    tags["git_commit"] = git_commit or "unknown"
    tags["status"] = "candidate"
    tags.update({k: _tag_value(v) for k, v in (extra_tags or {}).items()})
    code_hash = code_sha256 or logged_code_sha256(client, model_uri)
    if code_hash is not None:
        tags[CODE_SHA256_TAG] = code_hash
    else:
        log.warning(
            "%s: no code hash (tag %s) on the run that logged it: version of %s registered without one; "
            "loading it will need a pinned hash or trusting its code",
            model_uri,
            CODE_SHA256_TAG,
            name,
        )
    _create_registered_model(client, name)
    with global_tracking_uri(
        client.tracking_uri
    ):  # see `global_tracking_uri`: MLflow looks the model up globally
        created = client.create_model_version(
            name, source=model_uri, tags=tags, model_id=_logged_model_id(model_uri)
        )
    version = client.get_model_version(name, created.version)  # with its tags

    decision = decide_champion(client, name, version)
    client.set_model_version_tag(name, version.version, "compared_with", decision.compared_with)
    client.set_model_version_tag(name, version.version, "decision", decision.reason)
    client.update_model_version(name, version.version, description=f"{decision.status}: {decision.reason}")
    if decision.status == CHAMPION:
        if decision.previous_champion is not None:
            client.set_model_version_tag(name, decision.previous_champion, "status", "retired")
            client.set_model_version_tag(
                name, decision.previous_champion, "retired_by", f"version {version.version}"
            )
        client.set_registered_model_alias(name, CHAMPION, version.version)
    client.set_model_version_tag(name, version.version, "status", decision.status)
    return Registration(
        name=name,
        version=str(version.version),
        decision=decision,
        model_uri=f"models:/{name}/{version.version}",
    )
