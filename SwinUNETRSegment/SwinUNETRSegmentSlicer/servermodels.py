"""The models a server offers, asked without blocking: ``GET /models`` (the server's catalog,
each entry saying whether the server serves it), then ``GET /models/{name}`` for the card of
each model it serves. When "Run on" is a server the panel lists these, not this computer's
catalog: a server runs only its own models. Moved on by :meth:`ServerModels.tick` from the
panel's QTimer, like :class:`.enginerun.EngineRun`; no call waits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional
from urllib.parse import quote

from SwinUNETRSegmentLib.errors import UserError
from SwinUNETRSegmentLib.models.cards import ModelCard, card_from_dict
from SwinUNETRSegmentLib.service.client import ServiceError

from .nbhttp import Exchange, ssl_context

__all__ = ["ModelList", "ServerModels"]


@dataclass(frozen=True)
class ModelList:
    """What a server offers.

    Attributes:
        server: its URL.
        models: ``(name, card)`` of each model it serves, in the server's order.
        error: one line when the list could not be had (``models`` is then empty).
        leftOut: ``"name: reason"`` of served models whose card could not be read here.
    """

    server: str
    models: tuple[tuple[str, ModelCard], ...] = ()
    error: Optional[str] = None
    leftOut: tuple[str, ...] = ()


class ServerModels:
    """Asks the server at ``url`` (bearer ``token``; TLS checked against ``verify``) for its models.

    :attr:`result` is None until the answer is in, then a :class:`ModelList`.
    """

    def __init__(self, url: str, token: Optional[str], verify: Any = True, timeout: float = 15.0,
                 clock: Callable[[], float] = time.monotonic):
        self.url, self.timeout, self._clock = url.strip().rstrip("/"), timeout, clock
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._context = ssl_context(verify) if self.url.startswith("https:") else None
        self._cards: Optional[list[tuple[str, Exchange]]] = None  # one GET /models/{name} per served model
        self.result: Optional[ModelList] = None
        try:
            self._list: Optional[Exchange] = self._get("/models")
        except ServiceError as exc:  # not an http(s) URL
            self._list, self.result = None, ModelList(self.url, error=str(exc))

    @property
    def finished(self) -> bool:
        return self.result is not None

    def cancel(self) -> None:
        """Drop the requests still going; :attr:`result` stays None."""
        for _, x in ([("", self._list)] if self._list is not None else []) + (self._cards or []):
            x.close()
        self._list, self._cards = None, []

    def tick(self, budget: float = 0.005) -> Optional[ModelList]:
        """Move the requests on for about ``budget`` seconds; the :class:`ModelList` once it is in
        (None before, and after :meth:`cancel`)."""
        if self.result is not None or (self._list is None and self._cards == []):
            return self.result
        end = self._clock() + budget
        try:
            if self._cards is None:
                if not self._list.step(max(0.0, end - self._clock())):
                    return None
                self._cards = [(name, self._get(f"/models/{quote(name, safe='')}")) for name in self._served()]
                self._list = None
            for _, x in self._cards:
                if self._clock() >= end:
                    break
                x.step(max(0.001, end - self._clock()))
            if not all(x.done for _, x in self._cards):
                return None
            self.result = self._collect()
        except ServiceError as exc:
            self.cancel()
            self.result = ModelList(self.url, error=f"cannot list the server's models: {exc}")
        return self.result

    def _get(self, path: str) -> Exchange:
        return Exchange(self.url, "GET", path, headers=self._headers, timeout=self.timeout, context=self._context,
                        clock=self._clock)

    def _served(self) -> list[str]:
        answer = self._list.json()
        if not isinstance(answer, list) or not all(isinstance(m, dict) and m.get("name") for m in answer):
            raise ServiceError(f"{self.url} answered GET /models with no model list; is it a swinunetr-segment engine?")
        served = [str(m["name"]) for m in answer if m.get("served")]
        if not served:
            raise ServiceError("the server serves no model (its administrator adds one with 'swinunetr-segment "
                               "models download NAME' on the server)")
        return served

    def _collect(self) -> ModelList:
        models, leftOut = [], []
        for name, x in self._cards:
            try:
                entry = x.json()
                models.append((name, card_from_dict(entry["card"], source=f"{self.url}'s model '{name}'")))
            except ServiceError as exc:
                if exc.status in (401, 403) or exc.status is None:
                    raise
                leftOut.append(f"{name}: {exc}")
            except (UserError, KeyError, TypeError) as exc:
                leftOut.append(f"{name}: {exc}")
        if not models:
            raise ServiceError("none of its models could be read here: " + "; ".join(leftOut))
        return ModelList(self.url, tuple(models), None, tuple(leftOut))
