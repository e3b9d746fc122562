"""HTTP plumbing of the HTTP clients: per-thread sessions, JSON POSTs, classified errors."""

from __future__ import annotations

import threading

import requests

from copycat_tf.targets.base import PermanentError, RateLimited, TransientError

# Worth retrying: timeouts, rate limits, overloaded or restarting servers.
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})


def http_error(response: requests.Response, where: str) -> Exception:
    """TransientError (429, 5xx, 408) or PermanentError for a failed HTTP call."""
    try:
        detail = response.json().get("error", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    message = f"{where}: HTTP {response.status_code}: {str(detail)[:300]}"
    if response.status_code == 429:
        return RateLimited(message)
    if response.status_code in TRANSIENT_HTTP:
        return TransientError(message)
    return PermanentError(message)


class HttpSessions:
    """One requests.Session per thread (sessions are not thread-safe), all closed at once."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            with self._lock:
                self._sessions.append(session)
        return session

    def get_json(self, url: str, where: str, headers: dict | None = None, timeout_s: float = 30):
        """GET; the parsed JSON answer, or a classified (transient/permanent) error."""
        try:
            response = self.session().get(url, headers=headers or {}, timeout=timeout_s)
        except (requests.ConnectionError, requests.Timeout) as e:
            raise TransientError(f"{where}: {type(e).__name__}: {e}") from e
        return _json_answer(response, where)

    def post_json(
        self,
        url: str,
        body: bytes,
        timeout_s: float,
        where: str,
        headers: dict | None = None,
        content_type: str = "application/json",
    ):
        """POST a body; the parsed JSON answer, or a classified (transient/permanent) error."""
        try:
            response = self.session().post(
                url,
                data=body,
                timeout=timeout_s,
                headers={"Content-Type": content_type, **(headers or {})},
            )
        except (requests.ConnectionError, requests.Timeout) as e:
            raise TransientError(f"{where}: {type(e).__name__}: {e}") from e
        return _json_answer(response, where)

    def close(self) -> None:
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


def _json_answer(response: requests.Response, where: str):
    if response.status_code != 200:
        raise http_error(response, where)
    try:
        return response.json()
    except ValueError as e:
        raise PermanentError(f"{where}: answer is not JSON: {response.text[:200]}") from e
