"""Where weights come from, when the hub answers (a stand-in HfApi) and when it cannot: one line each with
the id, what is missing and the fix."""

from types import SimpleNamespace

import pytest

from trainer import preflight


def _http_error(cls, status: int):
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/owner/name")
    return cls(f"{status} from the hub", response=httpx2.Response(status, request=request))


class _Hub:
    """The two HfApi answers the plan reads: repository info with file sizes, or an error."""

    def __init__(self, answer):
        self.answer = answer

    def __call__(self):
        return self

    def model_info(self, repo_id, revision=None, files_metadata=False):
        assert files_metadata
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def answer(value, token=None):
        monkeypatch.setattr("huggingface_hub.HfApi", _Hub(value))
        monkeypatch.setattr("huggingface_hub.get_token", lambda: token)

    return answer


def test_public_repo_on_the_hub_has_a_size(online):
    files = [SimpleNamespace(size=3 * 2**30), SimpleNamespace(size=2**30), SimpleNamespace(size=None)]
    online(SimpleNamespace(siblings=files, gated=False))
    res = preflight.locate("model", "owner/name", None, "model.path=DIR", set())
    assert res.available and res.size == 4 * 2**30 and res.status == "on the hub (will download)"


def test_gated_repo_without_a_token(online):
    online(SimpleNamespace(siblings=[SimpleNamespace(size=10)], gated="manual"), token=None)
    res = preflight.locate("model", "owner/name", "v1", "model.path=DIR", set())
    assert not res.available and "\n" not in res.problem
    assert res.problem.startswith(
        "model owner/name@v1 is gated: accept its license at https://huggingface.co/owner/name"
    )
    assert "hf auth login" in res.problem and "--set model.path=DIR" in res.problem
    online(SimpleNamespace(siblings=[SimpleNamespace(size=10)], gated="manual"), token="hf_x")
    assert preflight.locate("model", "owner/name", "v1", "model.path=DIR", set()).available


@pytest.mark.parametrize(
    "error, expected",
    [
        ("RepositoryNotFoundError", "no such repository on the hub"),
        ("RevisionNotFoundError", "no revision 'v1' on the hub"),
        ("GatedRepoError", "is gated"),
    ],
)
def test_hub_errors_become_one_line(online, error, expected):
    from huggingface_hub import errors

    online(_http_error(getattr(errors, error), 404))
    res = preflight.locate("reward pickscore", "owner/name", "v1", "rewards=[...]", None)
    assert not res.available and expected in res.problem and "\n" not in res.problem
    # the same line when the error comes out of a loader, as the cause of its own exception
    try:
        try:
            raise _http_error(getattr(errors, error), 404)
        except OSError as inner:
            raise OSError("Cannot load model owner/name: ...\nlong text") from inner
    except OSError as outer:
        line = preflight.hub_load_error("owner/name", "v1", "model", "model.path=DIR", outer)
    assert expected in line and line.startswith("model owner/name")


def test_offline_and_not_cached():
    res = preflight.locate("encoder dinov2", "facebook/dinov2-base", None, "pec.encoder_path=DIR")
    assert res.status == "missing" and "not in the local hub cache" in res.problem
    assert "hf download facebook/dinov2-base" in res.problem
    assert preflight.hub_load_error("x/y", None, "model", "o", ValueError("unrelated")) is None


def test_offline_model_load_is_one_line():
    """The loader itself (pec sample / pec eval / the API) names the model and the fix, too."""
    from comfy_pec import PECError
    from trainer.backends.flux import FluxBackend

    with pytest.raises(PECError) as caught:
        FluxBackend.from_pretrained("pec-tests/no-such-flux")
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("model pec-tests/no-such-flux is not in the local hub cache")
