"""Which code produced a run: git commit, dirty flag and entry point, as MLflow tags (the
``mlflow.source.*`` tags MlflowClient, unlike a fluent run, does not set). Git facts come from
the checkout holding ``avsa``; without git (an image) the commit is ``$AVSA_GIT_COMMIT`` if the
build set it.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from avsa import __version__

# MLflow's own tag names (mlflow.utils.mlflow_tags), shown by the UI as "Source" and "Version".
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
GIT_COMMIT = "mlflow.source.git.commit"
GIT_BRANCH = "mlflow.source.git.branch"
GIT_REPO = "mlflow.source.git.repoURL"
GIT_DIRTY = "avsa.git.dirty"  # "true" | "false" | "unknown"
CODE_VERSION = "avsa.code_version"  # "<package version>+g<commit>[.dirty]" or "<version>"
ENTRY_ENV = "AVSA_ENTRY_POINT"  # set by `avsa` and jobs/*.py so Ray workers name the command
COMMIT_ENV = "AVSA_GIT_COMMIT"  # set by image builds that have no .git

_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding avsa/


@functools.lru_cache(maxsize=1)
def _git_facts() -> dict[str, str]:
    try:
        from git import Repo  # GitPython, which MLflow's own git tags use

        repo = Repo(_ROOT)  # the checkout holding avsa/, never one of its parents
        facts = {GIT_COMMIT: repo.head.commit.hexsha,
                 GIT_DIRTY: "true" if repo.is_dirty() else "false"}
    except Exception:  # no git or no checkout (an image): the build's commit, if it set one
        env = os.environ.get(COMMIT_ENV, "").strip()
        return {GIT_COMMIT: env} if env else {}
    if not repo.head.is_detached:
        facts[GIT_BRANCH] = repo.active_branch.name
    remote = next((r.url for r in repo.remotes if r.name == "origin"), None)
    if remote and "@" not in remote:  # never a URL with credentials in it
        facts[GIT_REPO] = remote
    return facts


def code_version_tags() -> dict[str, str]:
    """The tags for a new run: source (``$AVSA_ENTRY_POINT``, else this process's script), git
    commit, branch and dirty flag (``unknown`` without git), and ``avsa.code_version``. Never
    raises."""
    facts = {GIT_DIRTY: "unknown", **_git_facts()}
    version = __version__
    if GIT_COMMIT in facts:
        version += f"+g{facts[GIT_COMMIT][:12]}" + (".dirty" if facts[GIT_DIRTY] == "true" else "")
    entry = os.environ.get(ENTRY_ENV) or (Path(sys.argv[0]).name if sys.argv else "") or "python"
    return {SOURCE_NAME: entry, SOURCE_TYPE: "LOCAL", CODE_VERSION: version, **facts}
