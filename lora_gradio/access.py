"""Who may do what on a shared server: the operator runs the machine; every other visitor touches only their own.

A run, a dataset and a test image remember who made them (a login, or a browser's id when the app has no logins);
a thing with no record is the operator's. Every Studio call that changes or deletes something takes the visitor.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True)
class Visitor:
    """Who is asking: ``name`` is their login (or browser id), ``operator`` whether they run this server."""

    name: str | None = None
    operator: bool = True

    def owns(self, owner: str | None) -> bool:
        """Whether this visitor may stop, change or delete a thing recorded as ``owner``'s (None: the operator's)."""
        return self.operator or (owner is not None and owner == self.name)

    def require(self, owner: str | None, what: str) -> None:
        """Refuse, naming the rule, unless this visitor owns ``what``."""
        if not self.owns(owner):
            raise UserError(f"{what} belongs to another user: only they, or the operator who runs this server, can "
                            "change or delete it.")

    def require_operator(self, what: str) -> None:
        """Refuse ``what`` to everyone but the operator."""
        if not self.operator:
            raise UserError(f"Only the operator who runs this server can {what}.")


OPERATOR = Visitor()  # the Python API and the CLI run on the operator's own machine
LOCAL = "local"  # the one user of an app without logins that only this machine reaches


@dataclass(frozen=True)
class Access:
    """How a request's login becomes a :class:`Visitor`.

    With logins, ``operator`` is the operator's login. Without logins on this machine's loopback address, the one
    user is the operator; without logins on a public address, nobody is.
    """

    logins: bool = False
    operator: str | None = None
    public: bool = False

    def visitor(self, username: str | None, browser: str | None = None) -> Visitor:
        """The visitor behind a request: its login; without logins, the one local user, or on a public address the
        browser page's id (which a reload renews: such a stranger keeps nothing across reloads)."""
        if self.logins:
            return Visitor(username, username is not None and username == self.operator)
        if not self.public:
            return Visitor(LOCAL, True)
        return Visitor(f"browser {browser or 'unknown'}", False)

    def describe(self) -> str:
        """Who the operator is, as the page states it."""
        if self.logins:
            return ("The operator who runs this server may stop or delete any job, run, dataset or test image and "
                    "change the workspace settings. Every other login touches only what it made.")
        if self.public:
            return "This server has no logins, so nobody is its operator: every visitor touches only what they made."
        return "Only this machine can reach the app, so you are its operator."
