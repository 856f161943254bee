"""The one place where Beam is pointed at a GCS emulator (``STORAGE_EMULATOR_HOST``).

Every Beam job calls :func:`use_emulator_if_configured` in ``run(argv)`` before it
builds its pipeline. Against real GCS it does nothing.
"""

from __future__ import annotations

import logging
import os

_LOGGER = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def use_emulator_if_configured() -> bool:
    """Make Beam's ``gs://`` I/O use anonymous credentials when an emulator is configured.

    Why: Beam's GCS filesystem (``apache_beam.io.gcp.gcsio.GcsIO``) builds its
    google-cloud-storage client from ``apache_beam.internal.gcp.auth
    .get_service_credentials``, which calls ``google.auth.default()`` and retries it with
    exponential backoff (4 retries from 2 s) before giving up and connecting anonymously.
    On a machine without Google credentials (a laptop, CI, a test run) every first
    ``gs://`` access therefore stalls for about half a minute, and may probe the GCE
    metadata server. The ``--no_auth`` pipeline option does not help: GcsIO ignores it.

    The client itself already honours ``STORAGE_EMULATOR_HOST``: when Beam finds no
    credentials it calls ``storage.Client.create_anonymous_client()``, whose endpoint is
    taken from that variable. So the only thing to change is the credential lookup.
    Beam caches its result process-wide (``auth._Credentials``); filling that cache with
    "no credentials" makes Beam skip the lookup and go straight to the anonymous client,
    which talks to the emulator. ``set_running_in_gce`` is no help here: Beam 2.77 no
    longer reads the flag it sets.

    This touches a private Beam class, so it is kept here, in one function, and only
    acts when ``STORAGE_EMULATOR_HOST`` is set. The cache lives in the process that
    calls this: it covers the DirectRunner's in-process workers, not workers in other
    processes or machines (those use real GCS and real credentials anyway).

    Returns:
        True when the emulator is configured and Beam now uses anonymous credentials.
    """
    host = os.environ.get(EMULATOR_ENV)
    if not host:
        return False
    from apache_beam.internal.gcp import auth

    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials = None
        auth._Credentials._credentials_init = True
    _LOGGER.info("Beam gs:// I/O goes to the GCS emulator at %s, anonymously", host)
    return True
