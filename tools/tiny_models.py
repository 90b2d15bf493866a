from tests.support.tiny_models import *  # noqa
