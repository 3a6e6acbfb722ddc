//! What the identified caller may call (PERM-1..PERM-5): lists, grants and their validity,
//! checked when the headers arrive and again when a held body completes.

use super::*;

/// PERM-2, PERM-5, PERM-6, BWL-1, BWL-2 for an identified (and, above S0, authenticated) caller.
pub(super) fn authorize(
    policy: &Policy,
    req: &Request,
    app: &App,
    api: &Api,
    now: u64,
    ctx: &mut RequestContext,
) -> Result<(), Deny> {
    if let Some(u) = &ctx.user {
        if u.is_empty() || u.len() > 128 || !u.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(Deny::new(
                DenyReason::MalformedHeader,
                "x-user-id is empty, too long or not printable",
            ));
        }
        ctx.user = Some(lists::normal_user(u));
    }
    lists::check_opt_out(&policy.opted_out_users, ctx.user.as_deref())?;
    lists::check_lists(
        &policy.lists,
        api.index,
        &app.id,
        req.conn.client_ip,
        ctx.user.as_deref(),
    )?;
    if api.level > SecurityLevel::S0 {
        let i = access::select_grant(&policy.grants, &app.id, api.index, ctx.user.as_deref(), now)?;
        ctx.grant = policy.grants.get(i).map(|g| g.id.clone());
        ctx.grant_index = Some(i);
    }
    Ok(())
}

/// What may have changed while a body was arriving under the same policy: the time bound on
/// the body itself, the signature's `expires` and `created` window, the grant's validity and
/// windows. (Bans that started meanwhile are checked by the final batch.)
pub(super) fn recheck(policy: &Policy, ctx: &RequestContext, now: u64) -> Result<(), Deny> {
    let took = now.saturating_sub(ctx.started);
    if took > policy.max_body_seconds {
        return Err(Deny::new(
            DenyReason::BodyTimeout,
            format!(
                "the body took {took} s, at most {}",
                policy.max_body_seconds
            ),
        ));
    }
    if let Some(e) = ctx.expires.filter(|e| *e <= now) {
        return Err(Deny::new(
            DenyReason::SignatureExpired,
            format!("expires {e}, now {now} (when the body completed)"),
        ));
    }
    if let Some(c) = ctx
        .created
        .filter(|c| c.saturating_add(policy.clock_skew_seconds) < now)
    {
        return Err(Deny::new(
            DenyReason::CreatedTooOld,
            format!("created {c}, now {now} (when the body completed)"),
        ));
    }
    if let Some(g) = ctx.grant_index.and_then(|i| policy.grants.get(i)) {
        access::check_grant_validity(g, now)?;
    }
    Ok(())
}
