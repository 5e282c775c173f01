"""SQLAlchemy models for rpt (see core/ledger/rpt.py): the append-only chain of regulatory
proof tokens. The ``token`` text is the only source of truth; the other columns are
indexes over it for queries (verification re-derives everything from ``token``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .models import Base  # noqa: F401


class RegulatoryProofToken(Base):
    """One issued RPT (compact JWS). Append-only: triggers refuse UPDATE and DELETE."""

    __tablename__ = "rpts"
    __table_args__ = (Index("ix_rpts_subject", "subject"),)

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    token: Mapped[str] = mapped_column(Text)
    kid: Mapped[str] = mapped_column(String(120))
    iat: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    subject: Mapped[str] = mapped_column(String(500))
    prev_hash: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
