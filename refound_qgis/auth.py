"""The backend token in QGIS's authentication database (QgsAuthManager), never in QgsSettings.

A running server's token is a password: it is kept in an auth config (method ``Basic``, user
``refound``, the token as the password; available since QGIS 3.0 and encrypted with the user's
master password). QgsSettings holds only the config's id (``backend_authcfg``), which is no
secret. The dock, the analysis task and the Processing algorithms all read the token through
:func:`token_for`. Nothing here logs the token.
"""
from __future__ import annotations

from qgis.core import QgsApplication, QgsAuthMethodConfig

from refound_core.errors import InputError

from . import settings
from .settings import tr

METHOD = "Basic"
CONFIG_NAME = "ReFound backend token"
USER = "refound"


def _manager():
    am = QgsApplication.authManager()
    if am is None or am.isDisabled():
        raise InputError(tr("The QGIS authentication database is not available ({why}); the backend token "
                            "cannot be stored safely. Check Settings > Options > Authentication.")
                         .format(why=am.disabledMessage() if am is not None else "no manager"))
    return am


def _unlocked(am) -> None:
    # In the QGIS window this asks the user for the master password once per session.
    if not am.setMasterPassword(True):
        raise InputError(tr("The QGIS authentication database is locked: enter the master password "
                            "(Settings > Options > Authentication) to use the backend token."))


def store_token(token: str, authcfg: str = "") -> str:
    """Save ``token`` in an auth config (update ``authcfg`` when it exists); return its id."""
    am = _manager()
    _unlocked(am)
    cfg = QgsAuthMethodConfig()
    if authcfg and authcfg in am.configIds():
        am.loadAuthenticationConfig(authcfg, cfg, True)
    cfg.setName(CONFIG_NAME)
    cfg.setMethod(METHOD)
    cfg.setConfig("username", USER)
    cfg.setConfig("password", token)
    if cfg.id():
        ok = am.updateAuthenticationConfig(cfg)
    else:
        ok = am.storeAuthenticationConfig(cfg)
    if not ok or not cfg.id():
        raise InputError(tr("Could not save the backend token in the QGIS authentication database."))
    return cfg.id()


def token_for(authcfg: str) -> str:
    """The token saved in auth config ``authcfg`` ('' for no config)."""
    if not authcfg:
        return ""
    am = _manager()
    if authcfg not in am.configIds():
        raise InputError(tr("The authentication config {id} of the backend token does not exist; enter the "
                            "server token again in the ReFound panel.").format(id=authcfg))
    _unlocked(am)
    cfg = QgsAuthMethodConfig()
    if not am.loadAuthenticationConfig(authcfg, cfg, True):
        raise InputError(tr("Could not read the backend token from authentication config {id}.").format(id=authcfg))
    return cfg.config("password", "")


def remember_token(token: str) -> str:
    """Store ``token`` under the plugin's saved config id (created on first use); return the id."""
    authcfg = store_token(token, str(settings.value("backend_authcfg") or ""))
    settings.set_value("backend_authcfg", authcfg)
    return authcfg


def migrate_plain_token() -> None:
    """Move a token an older version left in QgsSettings into the auth database, then delete it."""
    old = settings.value("backend_token", "")
    if old:
        try:
            remember_token(str(old))
        except InputError:
            return  # keep it until the database can be unlocked; never lose the user's token
        settings.remove("backend_token")
