"""The service's domain errors: what can go wrong below the HTTP layer, named for what went wrong.

Each message is written for the person who can fix it (a labeler, an admin) and never holds a secret.
Only api.py turns them into HTTP statuses (its ERROR_STATUS table); the pipeline, the command line and
the bulk job raise and catch them without knowing about HTTP.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service reports to its caller instead of crashing."""


class ParamsError(ServiceError):
    """A project's extra params (or a command-line option standing for one) are malformed."""


class LabelConfigError(ServiceError):
    """The labeling config can't be served by this backend; the message says why."""


class PromptError(ServiceError):
    """A text prompt gives nothing to detect (no phrase maps to a label of the config)."""


class InteractiveError(ServiceError):
    """An interactive request (smart keypoints and rectangles, or its context) can't be turned into a prompt."""


class ModelsNotReady(ServiceError):
    """The models are still loading, or failed to load; the message says which."""


class ModelLoadError(ServiceError):
    """A model could not be loaded; the message names the environment variable and the path."""


class LabelStudioError(ServiceError):
    """Label Studio could not be reached, or refused the key; the message says which (keys redacted)."""


class LabelStudioRefused(LabelStudioError):
    """Label Studio refused the key (401/403)."""


class LabelStudioNotFound(LabelStudioError):
    """Label Studio has no such project (or view) for this key."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio did not answer, or answered 5xx, after every retry."""


class NotFound(ServiceError):
    """No such job (or other object of this service)."""


class Unauthorized(ServiceError):
    """The request needs a Label Studio key it did not present."""
