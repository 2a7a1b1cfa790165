"""One settings object, read lazily from app settings (environment variables).

Settings are never read at import time: the Functions host indexes the app with whatever
environment it has, and an exception at import makes it load zero functions. Code asks for
``get_settings()`` inside an invocation; a missing required value raises ``SettingMissing``
naming the setting, which fails only the invocation that needed it.
"""

from __future__ import annotations

import threading
from functools import cached_property

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingMissing(RuntimeError):
    """A required app setting is not configured."""

    def __init__(self, name: str, purpose: str = "") -> None:
        hint = f" ({purpose})" if purpose else ""
        super().__init__(f"app setting {name} is not configured{hint}")
        self.setting = name


class SettingInvalid(SettingMissing):
    """An app setting has a value that cannot be used (``5m`` where seconds are expected). A
    ``SettingMissing`` so that every caller answers it as "not configured"; the message names the
    setting and what is wrong, never its value (it may be a secret)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        RuntimeError.__init__(self, "app settings not valid: " + "; ".join(f"{name}: {why}" for name, why in problems))
        self.setting = ", ".join(name for name, _ in problems)


class Settings(BaseSettings):
    """App settings. Environment variable names are the public contract (DESIGN.md §3)."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", populate_by_name=True)

    # --- storage -------------------------------------------------------------------------
    storage_connection_string: str | None = Field(
        default=None, validation_alias=AliasChoices("AzureWebJobsStorage")
    )
    storage_account_name: str | None = Field(
        default=None, validation_alias=AliasChoices("AzureWebJobsStorage__accountName")
    )
    storage_table_service_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("AzureWebJobsStorage__tableServiceUri")
    )
    storage_queue_service_uri: str | None = Field(
        default=None, validation_alias=AliasChoices("AzureWebJobsStorage__queueServiceUri")
    )
    storage_credential: str | None = Field(
        default=None, validation_alias=AliasChoices("AzureWebJobsStorage__credential")
    )
    storage_client_id: str | None = Field(
        default=None, validation_alias=AliasChoices("AzureWebJobsStorage__clientId")
    )

    # --- Zoom ----------------------------------------------------------------------------
    zoom_account_id: str | None = Field(default=None, validation_alias=AliasChoices("ZOOM_ACCOUNT_ID"))
    zoom_client_id: str | None = Field(default=None, validation_alias=AliasChoices("ZOOM_CLIENT_ID"))
    zoom_client_secret: str | None = Field(default=None, validation_alias=AliasChoices("ZOOM_CLIENT_SECRET"))
    zoom_webhook_secret_token: str | None = Field(
        default=None, validation_alias=AliasChoices("ZOOM_WEBHOOK_SECRET_TOKEN")
    )
    zoom_api_base_url: str = Field(
        default="https://api.zoom.us/v2", validation_alias=AliasChoices("ZOOM_API_BASE_URL")
    )
    zoom_oauth_base_url: str = Field(
        default="https://zoom.us", validation_alias=AliasChoices("ZOOM_OAUTH_BASE_URL")
    )
    # A Zoom user-level OAuth app (authorization code): identifies a person's Zoom user when they
    # connect themselves. Empty = self-service links are made by the admin only.
    zoom_oauth_client_id: str | None = Field(default=None, validation_alias=AliasChoices("ZOOM_OAUTH_CLIENT_ID"))
    zoom_oauth_client_secret: str | None = Field(
        default=None, validation_alias=AliasChoices("ZOOM_OAUTH_CLIENT_SECRET")
    )
    # Zoom publishes no timestamp tolerance (API-FACTS §1, UNCONFIRMED): 300 s is the common choice
    # for a timestamp ahead of our clock. Behind it, a request may be a retry: Zoom retries +5, +20
    # and +60 minutes after the first attempt, and whether a retry is stamped afresh is UNCONFIRMED
    # too, so its first attempt's time is accepted up to the last retry (85 min) and some slack.
    # A replay inside that window is harmless: reports older than what is known are dropped.
    zoom_webhook_max_skew_seconds: int = Field(
        default=300, ge=0, validation_alias=AliasChoices("ZOOM_WEBHOOK_MAX_SKEW_SECONDS")
    )
    zoom_webhook_max_age_seconds: int = Field(
        default=5700, ge=0, validation_alias=AliasChoices("ZOOM_WEBHOOK_MAX_AGE_SECONDS")
    )
    zoom_webhook_max_body_bytes: int = Field(
        default=65536, validation_alias=AliasChoices("ZOOM_WEBHOOK_MAX_BODY_BYTES")
    )
    # "A user's status cannot be updated more than once per minute" (API-FACTS §3).
    zoom_presence_min_interval_seconds: float = Field(
        default=60.0, validation_alias=AliasChoices("ZOOM_PRESENCE_MIN_INTERVAL_SECONDS")
    )
    zoom_dnd_duration_minutes: int = Field(
        default=60, ge=1, le=1440, validation_alias=AliasChoices("ZOOM_DND_DURATION_MINUTES")
    )
    # How long to leave a user alone after Zoom says 5301 (not signed in to a Zoom client).
    zoom_not_signed_in_backoff_seconds: int = Field(
        default=900, validation_alias=AliasChoices("ZOOM_NOT_SIGNED_IN_BACKOFF_SECONDS")
    )

    # --- Entra / Graph -------------------------------------------------------------------
    entra_tenant_id: str | None = Field(default=None, validation_alias=AliasChoices("ENTRA_TENANT_ID"))
    entra_client_id: str | None = Field(default=None, validation_alias=AliasChoices("ENTRA_CLIENT_ID"))
    entra_client_secret: str | None = Field(
        default=None, validation_alias=AliasChoices("ENTRA_CLIENT_SECRET")
    )
    entra_client_certificate: str | None = Field(
        default=None, validation_alias=AliasChoices("ENTRA_CLIENT_CERTIFICATE")
    )
    # Client id of a user-assigned managed identity used as a federated credential
    # (managed-identity token as client assertion); empty = system-assigned when enabled.
    entra_managed_identity_client_id: str | None = Field(
        default=None, validation_alias=AliasChoices("ENTRA_MANAGED_IDENTITY_CLIENT_ID")
    )
    entra_use_managed_identity: bool = Field(
        default=False, validation_alias=AliasChoices("ENTRA_USE_MANAGED_IDENTITY")
    )
    entra_authority_host: str = Field(
        default="https://login.microsoftonline.com", validation_alias=AliasChoices("ENTRA_AUTHORITY_HOST")
    )
    graph_base_url: str = Field(
        default="https://graph.microsoft.com/v1.0", validation_alias=AliasChoices("GRAPH_BASE_URL")
    )
    # PEM (certificate + private key) used to decrypt rich notifications; empty = basic ones.
    graph_notification_certificate: str | None = Field(
        default=None, validation_alias=AliasChoices("GRAPH_NOTIFICATION_CERTIFICATE")
    )
    # A label for the encryptionCertificateId sent with that certificate (default "presence-bridge");
    # the certificate's thumbprint is always appended, so a new certificate is a new id.
    graph_notification_certificate_id: str | None = Field(
        default=None, validation_alias=AliasChoices("GRAPH_NOTIFICATION_CERTIFICATE_ID")
    )
    # Function key Graph presents on the notification and lifecycle URLs (?code=); empty = none.
    graph_notification_key: str | None = Field(
        default=None, validation_alias=AliasChoices("GRAPH_NOTIFICATION_KEY")
    )
    graph_notification_max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, validation_alias=AliasChoices("GRAPH_NOTIFICATION_MAX_BODY_BYTES")
    )
    # Delegated scopes of connected accounts; MSAL adds the reserved ones (offline_access, openid, profile).
    graph_delegated_scopes: str = Field(
        default="Presence.Read.All Presence.ReadWrite User.Read offline_access",
        validation_alias=AliasChoices("GRAPH_DELEGATED_SCOPES"),
    )
    # Presence subscriptions one connected sync account holds (Graph allows one per user per app,
    # API-FACTS §7; NICE CXone uses one account per 650 users).
    subscriptions_per_account: int = Field(
        default=1, ge=1, validation_alias=AliasChoices("SUBSCRIPTIONS_PER_ACCOUNT")
    )
    # Presence subscriptions live at most 60 minutes (API-FACTS §7).
    subscription_lifetime_minutes: int = Field(
        default=55, ge=15, le=60, validation_alias=AliasChoices("SUBSCRIPTION_LIFETIME_MINUTES")
    )
    # More than the maintenance timer's 5 minutes (or a subscription may lapse between two runs), and
    # more than 5 minutes under the lifetime (or every run renews every subscription it renewed the
    # run before); hence a lifetime of at least 15 minutes.
    subscription_renew_leeway_seconds: float = Field(
        default=900.0, ge=360, validation_alias=AliasChoices("SUBSCRIPTION_RENEW_LEEWAY_SECONDS")
    )
    # Who writes a person's Teams presence: "app" (application Presence.ReadWrite.All), "delegated"
    # (the person's own connected account, Presence.ReadWrite: self only), or "auto" (the app while
    # Graph accepts it, else the person's own account).
    teams_write_mode: str = Field(default="app", validation_alias=AliasChoices("TEAMS_WRITE_MODE"))
    # Lifetime of presence overlays we write to Teams (bound on a stuck state), minutes.
    teams_overlay_minutes: int = Field(
        default=60, ge=5, le=240, validation_alias=AliasChoices("TEAMS_OVERLAY_MINUTES")
    )
    # Overlays are confirmed against their source and renewed this long before they expire.
    overlay_renew_leeway_seconds: float = Field(
        default=600.0, ge=0, validation_alias=AliasChoices("OVERLAY_RENEW_LEEWAY_SECONDS")
    )

    # Shards whose Graph subscription is healthy are swept this often (others on every run).
    sweep_subscribed_interval_seconds: float = Field(
        default=300.0, ge=0, validation_alias=AliasChoices("SWEEP_SUBSCRIBED_INTERVAL_SECONDS")
    )

    # --- enablement scopes (defaults; the stored scopes edited through /api/manage/scopes win) ----
    sync_zoom_to_teams: bool = Field(default=True, validation_alias=AliasChoices("SYNC_ZOOM_TO_TEAMS"))
    sync_teams_to_zoom: bool = Field(default=True, validation_alias=AliasChoices("SYNC_TEAMS_TO_ZOOM"))
    # Comma-separated group ids; empty = no restriction. With groups set, only their members sync.
    scope_entra_group_ids: str = Field(default="", validation_alias=AliasChoices("SCOPE_ENTRA_GROUP_IDS"))
    scope_zoom_group_ids: str = Field(default="", validation_alias=AliasChoices("SCOPE_ZOOM_GROUP_IDS"))

    # --- directory matching and scope runs ---------------------------------------------------
    # Work time one invocation spends before it checkpoints and continues through the queue
    # (the Consumption plan's default function timeout is 5 minutes).
    directory_run_budget_seconds: float = Field(
        default=240.0, ge=0, validation_alias=AliasChoices("DIRECTORY_RUN_BUDGET_SECONDS")
    )
    # Entries kept per list (ambiguous, unmatched...) in the stored matching report.
    matching_report_list_cap: int = Field(
        default=200, ge=0, le=2000, validation_alias=AliasChoices("MATCHING_REPORT_LIST_CAP")
    )
    # Page sizes of the directory listings (Zoom allows 300, Graph 999).
    matching_zoom_page_size: int = Field(
        default=300, ge=1, le=300, validation_alias=AliasChoices("MATCHING_ZOOM_PAGE_SIZE")
    )
    matching_entra_page_size: int = Field(
        default=999, ge=1, le=999, validation_alias=AliasChoices("MATCHING_ENTRA_PAGE_SIZE")
    )
    # Links one matching invocation writes at the same time (each is its own storage round trip).
    matching_parallelism: int = Field(
        default=8, ge=1, le=64, validation_alias=AliasChoices("MATCHING_PARALLELISM")
    )
    # The most links one matching run may disable: more, and the run holds its disables (a listing
    # missing a chunk, or a domain renamed on one side first, would otherwise disable thousands).
    # A count ("500", as Entra Connect's deletion threshold) or a share of the links not disabled ("10%");
    # "0" turns the guard off. An admin lets a run past it (POST /api/manage/links/sync).
    matching_disable_limit: str = Field(
        default="500", validation_alias=AliasChoices("MATCHING_DISABLE_LIMIT")
    )

    # --- the app ---------------------------------------------------------------------------
    public_base_url: str | None = Field(default=None, validation_alias=AliasChoices("PUBLIC_BASE_URL"))
    presence_mapping: str | None = Field(default=None, validation_alias=AliasChoices("PRESENCE_MAPPING"))
    token_encryption_key: str | None = Field(
        default=None, validation_alias=AliasChoices("TOKEN_ENCRYPTION_KEY")
    )
    # How long a connect flow may take from its start to its callback, minutes (single-use either way).
    connect_flow_minutes: int = Field(default=10, ge=1, le=60, validation_alias=AliasChoices("CONNECT_FLOW_MINUTES"))
    # How long an admin's one-time invitation to connect a sync account stays valid, minutes.
    connect_invite_minutes: int = Field(
        default=60, ge=5, le=7 * 24 * 60, validation_alias=AliasChoices("CONNECT_INVITE_MINUTES")
    )
    # Upper bound on one outbound call including retries, seconds.
    http_total_timeout_seconds: float = Field(
        default=30.0, validation_alias=AliasChoices("HTTP_TOTAL_TIMEOUT_SECONDS")
    )

    # --- telemetry (shared/telemetry.py; configured on first use, never at import) ----------------
    applicationinsights_connection_string: str | None = Field(
        default=None, validation_alias=AliasChoices("APPLICATIONINSIGHTS_CONNECTION_STRING")
    )
    # "ClientId=<managed identity client id>;Authorization=AAD": Entra-authenticated ingestion.
    applicationinsights_authentication_string: str | None = Field(
        default=None, validation_alias=AliasChoices("APPLICATIONINSIGHTS_AUTHENTICATION_STRING")
    )
    # Without Application Insights: "console" or "otlp" exports metrics and traces (the sandbox); empty = none.
    telemetry_exporter: str = Field(default="", validation_alias=AliasChoices("TELEMETRY_EXPORTER"))

    @field_validator("teams_write_mode")
    @classmethod
    def _write_mode(cls, value: str) -> str:
        mode = (value or "app").strip().lower()
        if mode not in ("app", "delegated", "auto"):
            raise ValueError("TEAMS_WRITE_MODE must be app, delegated or auto")
        return mode

    @model_validator(mode="after")
    def _renew_leeway_within_lifetime(self) -> Settings:
        if self.subscription_renew_leeway_seconds >= self.subscription_lifetime_minutes * 60 - 300:
            raise ValueError("SUBSCRIPTION_RENEW_LEEWAY_SECONDS must be more than 5 minutes under "
                             "SUBSCRIPTION_LIFETIME_MINUTES (the maintenance timer comes every 5 minutes)")
        return self

    @field_validator("matching_disable_limit")
    @classmethod
    def _disable_limit(cls, value: str) -> str:
        text = (value or "").strip()
        number = text[:-1].strip() if text.endswith("%") else text
        if not number.isdigit() or (text.endswith("%") and int(number) > 100):
            raise ValueError("MATCHING_DISABLE_LIMIT must be a count (500) or a percentage (10%)")
        return f"{int(number)}%" if text.endswith("%") else str(int(number))

    def disable_limit(self, active_links: int) -> int | None:
        """The most links a matching run may disable with ``active_links`` active; None = no limit."""
        text = self.matching_disable_limit
        if text.endswith("%"):
            share = int(text[:-1])
            # Rounded up, and at least one: "10%" of 9 links must not hold every single disable.
            return None if share == 0 else max(1, -(-active_links * share // 100))
        return int(text) or None

    def require(self, attribute: str, setting: str, purpose: str = "") -> str:
        value = getattr(self, attribute)
        if value in (None, ""):
            raise SettingMissing(setting, purpose)
        return value

    @cached_property
    def zoom_webhook_secrets(self) -> list[str]:
        """Every accepted webhook secret token (two during a rotation)."""
        raw = self.require("zoom_webhook_secret_token", "ZOOM_WEBHOOK_SECRET_TOKEN", "Zoom webhook signatures")
        return [part.strip() for part in raw.split(",") if part.strip()]


_lock = threading.Lock()
_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    global _settings
    if _settings is None:
        with _lock:
            if _settings is None:
                try:
                    _settings = Settings()
                except ValidationError as exc:
                    # ``from None``: pydantic's own message quotes the value.
                    raise SettingInvalid([(".".join(str(p) for p in e["loc"]) or "settings", e["msg"])
                                          for e in exc.errors(include_input=False)]) from None
    return _settings


def reset_settings() -> None:
    """Forget cached settings (tests and the local host change the environment)."""
    global _settings
    with _lock:
        _settings = None
