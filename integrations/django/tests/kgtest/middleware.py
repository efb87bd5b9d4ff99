"""Subclasses of the package's classes, as an application might write them: the order checks
must recognise them."""

from rest_framework.authentication import SessionAuthentication

from knoxgate_django.middleware import KnoxgateMiddleware


class MyKnoxgateMiddleware(KnoxgateMiddleware):
    pass


class MySessionAuthentication(SessionAuthentication):
    pass
