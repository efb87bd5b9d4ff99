from django.contrib.auth.hashers import PBKDF2PasswordHasher


class FastPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    """pbkdf2_sha256 at the iteration count knoxgate is configured with in the run."""

    iterations = 1000
