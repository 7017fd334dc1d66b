"""What goes into each corpus: per domain, its sources, their pins and their byte budgets.

`builtin_recipe` is the corpus `make demo` trains on (about 3 MB per domain, built on demand into
the cache); `sample_recipe` produced the small sample shipped in `moekit/data/sample`, from
sources whose licences allow redistribution. Changing a recipe changes its fingerprint, which
invalidates cached builds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from moekit.data.sources.base import Source
from moekit.data.sources.chatterbot import ChatterbotDialogues
from moekit.data.sources.generated import GeneratedMath, GeneratedRecords
from moekit.data.sources.gettext_catalogs import GettextCatalogs
from moekit.data.sources.shakespeare import ShakespeareWorks
from moekit.data.sources.stdlib_code import StdlibCode
from moekit.data.sources.tables import IsoCodesJson, TzdataTables

RECIPE_VERSION = 1
MATH_SEED = 0
RECORDS_SEED = 0
CATALOG_LANGUAGES = ("de", "es", "fr", "it", "ja", "ko", "pl", "pt_BR", "ru", "uk", "zh_CN")

# Digests of the machine-local inputs these recipes were made with (CPython 3.11.7 on Debian 12).
STDLIB_SHA256 = "8537ea0ff012e9d3be3b7e176d52bd400bbcc54d7c7d50cfe7cd5b66f22f9f05"
CATALOGS_SHA256 = "31d36bd14dc768e46b0be1a8c19c12a7767a02f99893f13f6fae1cecaeb1cd9b"
TZDATA_SHA256 = "d4ac29f35cc80baf615de322f584b5dbb86d653467763ab846d4066ddc8349e5"
ISO_CODES_SHA256 = "6ee3bf0b4f4915bac001b880b4658a56e7cb42acd745659563fcea9f55bdab87"


@dataclass(frozen=True)
class DomainRecipe:
    domain: str
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    domains: tuple[DomainRecipe, ...]

    @property
    def fingerprint(self) -> str:
        """A digest of every source's settings and pins (dataclass reprs are deterministic)."""
        return hashlib.sha256(repr((self.name, self.version, self.domains)).encode()).hexdigest()


def builtin_recipe() -> Recipe:
    """About 3 MB of text per domain; needs the two pinned PyPI sdists (or falls back to the sample)."""
    domains = (
        DomainRecipe("code", (StdlibCode(budget_bytes=3_000_000, pinned_sha256=STDLIB_SHA256),)),
        DomainRecipe("english", (ShakespeareWorks(budget_bytes=3_000_000),)),
        DomainRecipe(
            "multilingual",
            (
                ChatterbotDialogues(budget_bytes=1_000_000),
                GettextCatalogs(CATALOG_LANGUAGES, budget_bytes=2_200_000, pinned_sha256=CATALOGS_SHA256),
            ),
        ),
        DomainRecipe("math", (GeneratedMath(seed=MATH_SEED, count=70_000),)),
        DomainRecipe(
            "structured",
            (
                GeneratedRecords(seed=RECORDS_SEED, budget_bytes=2_200_000),
                IsoCodesJson(budget_bytes=800_000, pinned_sha256=ISO_CODES_SHA256),
                TzdataTables(pinned_sha256=TZDATA_SHA256),
            ),
        ),
    )
    return Recipe("builtin", RECIPE_VERSION, domains)


def sample_recipe() -> Recipe:
    """About 160 KB per domain from redistributable sources only (see sample/NOTICE.md)."""
    domains = (
        DomainRecipe(
            "code",
            (StdlibCode(budget_bytes=160_000, pinned_sha256=STDLIB_SHA256, max_file_bytes=12_000),),
        ),
        DomainRecipe("english", (ShakespeareWorks(budget_bytes=160_000, max_document_bytes=8_000),)),
        DomainRecipe("multilingual", (ChatterbotDialogues(budget_bytes=160_000),)),
        DomainRecipe("math", (GeneratedMath(seed=MATH_SEED, count=3_600),)),
        DomainRecipe(
            "structured",
            (
                GeneratedRecords(seed=RECORDS_SEED, budget_bytes=120_000),
                TzdataTables(pinned_sha256=TZDATA_SHA256),
            ),
        ),
    )
    return Recipe("sample", RECIPE_VERSION, domains)
